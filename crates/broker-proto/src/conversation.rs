//! The conversation key: the unit the broker (and the worker) serialise on.
//!
//! It must match the worker's Durable Object key exactly, or the broker's ordering and the
//! worker's lock would disagree (`docs/worker-contract.md` §1.7).

use std::fmt;

/// How the worker classifies a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatType {
    Private,
    Group,
    Supergroup,
}

impl ChatType {
    /// Parses the worker's `chat_type` values.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "private" => Some(Self::Private),
            "group" => Some(Self::Group),
            "supergroup" => Some(Self::Supergroup),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Group => "group",
            Self::Supergroup => "supergroup",
        }
    }

    pub fn is_group(self) -> bool {
        !matches!(self, Self::Private)
    }
}

/// A conversation key such as `user:unfoldingWord:alice` or `group:unfoldingWord:-100:42`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Conversation(String);

impl Conversation {
    /// The key of a private chat.
    pub fn private(org: &str, user_id: &str) -> Self {
        Self(["user:", org, ":", user_id].concat())
    }

    /// The key of a group chat, or of one thread (topic) of a supergroup.
    pub fn group(org: &str, chat_id: &str, thread_id: Option<&str>) -> Self {
        match thread_id {
            Some(thread) => Self(["group:", org, ":", chat_id, ":", thread].concat()),
            None => Self(["group:", org, ":", chat_id].concat()),
        }
    }

    /// The key for a chat as the worker derives it: groups by chat (and thread), the rest by user.
    pub fn for_chat(
        org: &str,
        chat_type: ChatType,
        user_id: &str,
        chat_id: Option<&str>,
        thread_id: Option<&str>,
    ) -> Self {
        match (chat_type.is_group(), chat_id) {
            (true, Some(chat)) => Self::group(org, chat, thread_id),
            _ => Self::private(org, user_id),
        }
    }

    /// Wraps a key read back from Redis.
    pub fn from_key(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Conversation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_worker_durable_object_names() {
        assert_eq!(
            Conversation::for_chat("uW", ChatType::Private, "alice", Some("123"), None).as_str(),
            "user:uW:alice"
        );
        assert_eq!(
            Conversation::for_chat("uW", ChatType::Group, "alice", Some("-100"), None).as_str(),
            "group:uW:-100"
        );
        assert_eq!(
            Conversation::for_chat("uW", ChatType::Supergroup, "bob", Some("-100"), Some("42"))
                .as_str(),
            "group:uW:-100:42"
        );
    }
}
