//! Every Redis key name the broker uses, formatted in one place.
//!
//! Keys are `<prefix>:{<shard>}:<kind>[:<id>]`: the `{shard}` hash tag puts every key a
//! script touches into one Redis Cluster slot. Reply channels are not keys and carry no tag.
//! The names of the keys every message uses are joined with `concat`, which sizes the string
//! once, rather than `format!`, on the per-message path. The
//! enqueue and finish calls, which name five and four keys for every message, take them as
//! a [`Name`] instead: its pieces are written straight into the command, with no string of
//! their own.

use std::io::Write;

use broker_proto::Conversation;
use redis::{RedisWrite, ToRedisArgs};

/// A key name in pieces. As a command argument it is written into the command's buffer
/// piece by piece; [`Name::join`] makes it one string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Name<'a>([&'a str; 5]);

impl Name<'_> {
    pub fn join(&self) -> String {
        self.0.concat()
    }
}

impl ToRedisArgs for Name<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut arg = out.writer_for_next_arg();
        for piece in self.0 {
            // Into the command's own buffer: this cannot fail.
            let _ = arg.write_all(piece.as_bytes());
        }
    }
}

/// Formats key names for one prefix and shard.
#[derive(Debug, Clone)]
pub struct Keys {
    base: String,
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str, shard: &str) -> Self {
        Self {
            base: format!("{prefix}:{{{shard}}}"),
            prefix: prefix.to_owned(),
        }
    }

    /// Conversations with queued work and nothing in flight; `BLMOVE` takes from the right.
    pub fn ready(&self) -> String {
        [self.base.as_str(), ":ready"].concat()
    }

    /// Conversations with queued or running work, scored by the enqueue time (ms) of their
    /// oldest unfinished message: the admin API's ranking, without a `SCAN`.
    pub fn oldest(&self) -> String {
        [self.base.as_str(), ":oldest"].concat()
    }

    /// Held conversations (hash: conversation → who held it, and when): they start nothing.
    pub fn held(&self) -> String {
        [self.base.as_str(), ":held"].concat()
    }

    /// Set while drainers are paused (its value says who paused them, and when).
    pub fn paused(&self) -> String {
        [self.base.as_str(), ":paused"].concat()
    }

    /// Conversations one drainer has claimed.
    pub fn processing(&self, drainer: &str) -> String {
        [self.base.as_str(), ":processing:", drainer].concat()
    }

    /// Message ids of one conversation, FIFO.
    pub fn queue(&self, conversation: &Conversation) -> String {
        self.queue_name(conversation).join()
    }

    pub fn queue_name<'a>(&'a self, conversation: &'a Conversation) -> Name<'a> {
        Name([&self.base, ":q:", conversation.as_str(), "", ""])
    }

    /// State of one conversation: absent when idle.
    pub fn conversation(&self, conversation: &Conversation) -> String {
        self.conversation_name(conversation).join()
    }

    pub fn conversation_name<'a>(&'a self, conversation: &'a Conversation) -> Name<'a> {
        Name([&self.base, ":conv:", conversation.as_str(), "", ""])
    }

    /// One message's record.
    pub fn message(&self, message_id: &str) -> String {
        self.message_name(message_id).join()
    }

    pub fn message_name<'a>(&'a self, message_id: &'a str) -> Name<'a> {
        Name([&self.base, ":msg:", message_id, "", ""])
    }

    /// What every key starts with, `<prefix>:{<shard>}:`: the claim script builds the names
    /// of the conversation it took and of its head message from it.
    pub fn script_base(&self) -> String {
        format!("{}:", self.base)
    }

    /// One message's SSE frames.
    pub fn events(&self, message_id: &str) -> String {
        self.events_name(message_id).join()
    }

    pub fn events_name<'a>(&'a self, message_id: &'a str) -> Name<'a> {
        Name([&self.base, ":events:", message_id, "", ""])
    }

    /// The message id a client message id was first accepted as.
    pub fn dedup(&self, conversation: &Conversation, client_message_id: &str) -> String {
        self.dedup_name(conversation, client_message_id).join()
    }

    pub fn dedup_name<'a>(
        &'a self,
        conversation: &'a Conversation,
        client_message_id: &'a str,
    ) -> Name<'a> {
        Name([
            &self.base,
            ":dedup:",
            conversation.as_str(),
            ":",
            client_message_id,
        ])
    }

    /// Drainer id -> last heartbeat (ms).
    pub fn drainers(&self) -> String {
        [self.base.as_str(), ":drainers"].concat()
    }

    /// Messages and callbacks that failed for good.
    pub fn dead(&self) -> String {
        [self.base.as_str(), ":dead"].concat()
    }

    /// Counters kept by the scripts.
    pub fn stats(&self) -> String {
        [self.base.as_str(), ":stats"].concat()
    }

    /// The pub/sub channel of one API process's sync waiters. Under this name (`replies`; it
    /// was `reply`) the process also reads the outcomes of several messages in one pub/sub
    /// message, so a drainer sends them so only to a channel that starts with
    /// [`Keys::batched_replies`].
    pub fn reply_channel(&self, instance: &str) -> String {
        [self.batched_replies().as_str(), instance].concat()
    }

    /// How the reply channels of API processes that read batched outcomes start.
    pub fn batched_replies(&self) -> String {
        format!("{}:replies:", self.prefix)
    }

    /// The prefix every key of this layout starts with, for `SCAN` in tests and tools.
    pub fn pattern(&self) -> String {
        format!("{}:*", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_goes_into_a_command_as_its_joined_string_would() {
        let k = Keys::new("bt", "0");
        let c = Conversation::from_key("user:uW:alice");
        let names = [
            k.message_name("m1"),
            k.queue_name(&c),
            k.conversation_name(&c),
            k.events_name("m1"),
            k.dedup_name(&c, "c-7"),
        ];
        let mut pieces = redis::cmd("EVALSHA");
        let mut joined = redis::cmd("EVALSHA");
        for name in names {
            pieces.arg(name).arg("next");
            joined.arg(name.join()).arg("next");
        }
        assert_eq!(pieces.get_packed_command(), joined.get_packed_command());
        assert_eq!(
            k.dedup_name(&c, "c-7").join(),
            "bt:{0}:dedup:user:uW:alice:c-7"
        );
    }

    #[test]
    fn key_names_are_pinned() {
        let k = Keys::new("bt", "0");
        let c = Conversation::from_key("user:uW:alice");
        assert_eq!(k.ready(), "bt:{0}:ready");
        assert_eq!(k.processing("d1"), "bt:{0}:processing:d1");
        assert_eq!(k.queue(&c), "bt:{0}:q:user:uW:alice");
        assert_eq!(k.conversation(&c), "bt:{0}:conv:user:uW:alice");
        assert_eq!(k.message("m1"), "bt:{0}:msg:m1");
        assert_eq!(k.events("m1"), "bt:{0}:events:m1");
        assert_eq!(k.dedup(&c, "wamid.1"), "bt:{0}:dedup:user:uW:alice:wamid.1");
        assert_eq!(k.drainers(), "bt:{0}:drainers");
        assert_eq!(k.dead(), "bt:{0}:dead");
        assert_eq!(k.stats(), "bt:{0}:stats");
        assert_eq!(k.reply_channel("api-1"), "bt:replies:api-1");
        assert_eq!(k.batched_replies(), "bt:replies:");
        assert_eq!(k.pattern(), "bt:{0}:*");
    }
}
