//! What operators read and change (the admin API, docs/design.md §10): conversations ranked
//! by their oldest unfinished message (the `oldest` sorted set, kept by the scripts, so the
//! cost never grows with idle users), one conversation's queue, whole message records, the
//! dead list and its redrive, holding a conversation and pausing the drainers.

use std::collections::HashMap;

use broker_proto::Conversation;
use redis::{AsyncCommands, Value};
use serde::Serialize;
use serde_json::Value as Json;

use super::{as_string, Queue, QueueError};
use crate::clock::now_ms;
use crate::scripts::Call;

/// Which conversations a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// With messages waiting to start.
    Waiting,
    /// With a turn at the worker.
    Running,
    /// Held by an operator.
    Held,
    /// Any with work.
    Any,
}

impl StateFilter {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "waiting" => Some(Self::Waiting),
            "running" => Some(Self::Running),
            "held" => Some(Self::Held),
            "any" => Some(Self::Any),
            _ => None,
        }
    }
}

/// One conversation in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationSummary {
    pub conversation: String,
    /// `ready` (waiting for a drainer), `running`, `held` (parked), or `idle`.
    pub state: String,
    pub held: bool,
    /// Messages waiting to start (the running one not counted).
    pub waiting: u64,
    pub running_message_id: Option<String>,
    pub drainer: Option<String>,
    /// Since when it is in its state (ms).
    pub since: Option<u64>,
    /// When its oldest unfinished message (running or waiting) was enqueued (ms).
    pub oldest_enqueued_at: Option<u64>,
    /// When its oldest waiting message was enqueued (ms).
    pub oldest_waiting_at: Option<u64>,
}

/// One message of a conversation's queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueuedMessage {
    pub message_id: String,
    pub status: Option<String>,
    pub mode: Option<String>,
    pub attempts: Option<u64>,
    pub enqueued_at: Option<u64>,
    pub started_at: Option<u64>,
    pub drainer: Option<String>,
    pub client_message_id: Option<String>,
}

/// One conversation as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationDetail {
    #[serde(flatten)]
    pub summary: ConversationSummary,
    /// Who held it, and when (`{"by", "at"}`), while held.
    pub held_by: Option<Json>,
    pub messages: Vec<QueuedMessage>,
}

/// What a redrive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redriven {
    /// Back in its conversation; position 1 = next to run.
    Queued {
        position: u64,
    },
    Absent,
    NotFailed(String),
    /// Its request is gone (the record expired, or it failed before failed messages kept it).
    NoBody,
}

/// The most of a conversation's queue shown.
const MAX_SHOWN: isize = 200;

impl Queue {
    /// Conversations with work, oldest unfinished message first, filtered, at most `limit`.
    /// Reads the `oldest` set a page at a time, so a listing costs what it shows (and what
    /// it skips of active conversations), never what idle users would.
    pub async fn conversations(
        &self,
        filter: StateFilter,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, QueueError> {
        let held: HashMap<String, String> =
            read!(self, |conn| conn.hgetall(self.keys.held()).await?)?;
        let names: Vec<(String, Option<u64>)> = if filter == StateFilter::Held {
            let mut names: Vec<_> = held.keys().map(|c| (c.clone(), None)).collect();
            names.sort();
            names
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        if filter == StateFilter::Held {
            for chunk in names.chunks(256) {
                out.extend(self.summaries(chunk, &held).await?);
            }
            out.sort_by_key(|s| s.oldest_enqueued_at.unwrap_or(u64::MAX));
            out.truncate(limit);
            return Ok(out);
        }
        let page = limit.clamp(64, 1024);
        let mut start = 0isize;
        loop {
            let stop = start + page as isize - 1;
            let ranked: Vec<(String, f64)> = read!(self, |conn| conn
                .zrange_withscores(self.keys.oldest(), start, stop)
                .await?)?;
            if ranked.is_empty() {
                break;
            }
            let names: Vec<(String, Option<u64>)> = ranked
                .iter()
                .map(|(c, score)| (c.clone(), Some(*score as u64)))
                .collect();
            for summary in self.summaries(&names, &held).await? {
                let keep = match filter {
                    StateFilter::Waiting => summary.waiting > 0,
                    StateFilter::Running => summary.state == "running",
                    StateFilter::Held => summary.held,
                    StateFilter::Any => true,
                };
                if keep {
                    out.push(summary);
                }
            }
            if out.len() >= limit || ranked.len() < page {
                break;
            }
            start += page as isize;
        }
        if filter == StateFilter::Waiting {
            out.sort_by_key(|s| s.oldest_waiting_at.unwrap_or(u64::MAX));
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The summaries of `names` (conversation, its `oldest` score), two round trips in all.
    async fn summaries(
        &self,
        names: &[(String, Option<u64>)],
        held: &HashMap<String, String>,
    ) -> Result<Vec<ConversationSummary>, QueueError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (name, _) in names {
            let conv = Conversation::from_key(name.clone());
            pipe.hgetall(self.keys.conversation(&conv))
                .llen(self.keys.queue(&conv))
                .lrange(self.keys.queue(&conv), 0, 1);
        }
        let replies: Vec<Value> = read!(self, |conn| pipe.query_async(&mut conn).await?)?;
        let mut out = Vec::with_capacity(names.len());
        let mut second = redis::pipe();
        let mut asks = Vec::new();
        for (i, (name, score)) in names.iter().enumerate() {
            let hash: HashMap<String, String> =
                redis::from_redis_value(replies[3 * i].clone()).unwrap_or_default();
            let length: u64 = redis::from_redis_value(replies[3 * i + 1].clone()).unwrap_or(0);
            let heads: Vec<String> =
                redis::from_redis_value(replies[3 * i + 2].clone()).unwrap_or_default();
            let state = hash.get("state").cloned().unwrap_or_else(|| "idle".into());
            let running = state == "running";
            let waiting = if running {
                length.saturating_sub(1)
            } else {
                length
            };
            // The oldest waiting message: the head, or the one after the running head.
            let first_waiting = heads.get(usize::from(running)).cloned();
            if let Some(id) = &first_waiting {
                second.hget(self.keys.message(id), "enqueued_at");
                asks.push(out.len());
            }
            out.push(ConversationSummary {
                conversation: name.clone(),
                held: held.contains_key(name),
                waiting,
                running_message_id: running.then(|| hash.get("message_id").cloned()).flatten(),
                drainer: running.then(|| hash.get("drainer").cloned()).flatten(),
                since: hash.get("since").and_then(|v| v.parse().ok()),
                oldest_enqueued_at: *score,
                oldest_waiting_at: None,
                state,
            });
        }
        if !asks.is_empty() {
            let times: Vec<Option<u64>> =
                read!(self, |conn| second.query_async(&mut conn).await?)?;
            for (i, at) in asks.into_iter().zip(times) {
                out[i].oldest_waiting_at = at;
            }
        }
        Ok(out)
    }

    /// One conversation: its summary, who held it, and its queue (the first 200).
    pub async fn conversation_detail(
        &self,
        conversation: &Conversation,
    ) -> Result<ConversationDetail, QueueError> {
        let (score, held_by, ids): (Option<f64>, Option<String>, Vec<String>) =
            read!(self, |conn| redis::pipe()
                .zscore(self.keys.oldest(), conversation.as_str())
                .hget(self.keys.held(), conversation.as_str())
                .lrange(self.keys.queue(conversation), 0, MAX_SHOWN - 1)
                .query_async(&mut conn)
                .await?)?;
        let mut held = HashMap::new();
        if let Some(by) = &held_by {
            held.insert(conversation.as_str().to_owned(), by.clone());
        }
        let names = [(conversation.as_str().to_owned(), score.map(|s| s as u64))];
        let summary = self
            .summaries(&names, &held)
            .await?
            .pop()
            .ok_or_else(|| QueueError::Protocol("no summary".into()))?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(self.keys.message(id)).arg(&[
                "status",
                "mode",
                "attempts",
                "enqueued_at",
                "started_at",
                "drainer",
                "client_message_id",
            ]);
        }
        let rows: Vec<Vec<Option<String>>> = if ids.is_empty() {
            Vec::new()
        } else {
            read!(self, |conn| pipe.query_async(&mut conn).await?)?
        };
        let messages = ids
            .into_iter()
            .zip(rows)
            .map(|(message_id, row)| {
                let field = |i: usize| row.get(i).cloned().flatten();
                let number = |i: usize| field(i).and_then(|v| v.parse().ok());
                QueuedMessage {
                    message_id,
                    status: field(0),
                    mode: field(1),
                    attempts: number(2),
                    enqueued_at: number(3),
                    started_at: number(4),
                    drainer: field(5),
                    client_message_id: field(6),
                }
            })
            .collect();
        Ok(ConversationDetail {
            summary,
            held_by: held_by.and_then(|b| serde_json::from_str(&b).ok()),
            messages,
        })
    }

    /// A message's whole record, its request body left out (its size shown instead).
    pub async fn message_full(
        &self,
        message_id: &str,
    ) -> Result<Option<HashMap<String, Json>>, QueueError> {
        let fields: HashMap<String, String> = read!(self, |conn| conn
            .hgetall(self.keys.message(message_id))
            .await?)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut out = HashMap::new();
        for (name, value) in fields {
            let json = match name.as_str() {
                "body" => {
                    out.insert("body_bytes".into(), Json::from(value.len()));
                    continue;
                }
                "outcome" | "front" => serde_json::from_str(&value).unwrap_or(Json::String(value)),
                "attempts" | "enqueued_at" | "started_at" | "finished_at" | "callback_attempts"
                | "redriven_at" => value.parse::<u64>().map_or(Json::String(value), Json::from),
                _ => Json::String(value),
            };
            out.insert(name, json);
        }
        out.insert("message_id".into(), Json::from(message_id));
        Ok(Some(out))
    }

    /// The message a `client_message_id` named in a conversation, within the dedup window.
    pub async fn find_by_client_message_id(
        &self,
        conversation: &Conversation,
        client_message_id: &str,
    ) -> Result<Option<String>, QueueError> {
        Ok(read!(self, |conn| conn
            .get(self.keys.dedup(conversation, client_message_id))
            .await?)?)
    }

    /// The dead list, newest first, each entry with its `entry` id (`message:<id>` or
    /// `callback:<webhook-id>`) and the JSON as stored: at most `limit` of `kind` (any when
    /// `None`), from entries enqueued since `since` (ms) when given.
    pub async fn dead_entries(
        &self,
        kind: Option<&str>,
        since: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(String, Json, String)>, QueueError> {
        let raw: Vec<String> = read!(self, |conn| conn.lrange(self.keys.dead(), 0, -1).await?)?;
        let mut out = Vec::new();
        for text in raw {
            let Ok(entry) = serde_json::from_str::<Json>(&text) else {
                continue;
            };
            let entry_kind = entry["kind"].as_str().unwrap_or("message");
            if kind.is_some_and(|k| k != entry_kind) {
                continue;
            }
            if since.is_some_and(|s| entry["at"].as_u64().unwrap_or(0) < s) {
                continue;
            }
            let id = match entry_kind {
                "callback" => format!(
                    "callback:{}",
                    entry["webhook_id"]
                        .as_str()
                        .or(entry["message_id"].as_str())
                        .unwrap_or("")
                ),
                _ => format!("message:{}", entry["message_id"].as_str().unwrap_or("")),
            };
            out.push((id, entry, text));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Takes one entry off the dead list (its JSON as stored).
    pub async fn drop_dead(&self, raw: &str) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let removed: i64 = conn.lrem(self.keys.dead(), 1, raw).await?;
        Ok(removed > 0)
    }

    /// Puts a failed message back at the head of its conversation (after its running turn),
    /// ahead of what queued since, and takes `dead_entry` (as stored) off the dead list.
    pub async fn redrive_message(
        &self,
        message_id: &str,
        dead_entry: &str,
    ) -> Result<Redriven, QueueError> {
        let mut conn = self.conn().await?;
        let conversation: Option<String> = conn
            .hget(self.keys.message(message_id), "conversation")
            .await?;
        let Some(conversation) = conversation else {
            if !dead_entry.is_empty() {
                self.drop_dead(dead_entry).await?;
            }
            return Ok(Redriven::Absent);
        };
        let conv = Conversation::from_key(conversation);
        let reply: Vec<Value> = Call::new(&self.scripts.redrive, 8)
            .key(self.keys.message(message_id))
            .key(self.keys.queue(&conv))
            .key(self.keys.conversation(&conv))
            .key(self.keys.ready())
            .key(self.keys.stats())
            .key(self.keys.events(message_id))
            .key(self.keys.oldest())
            .key(self.keys.dead())
            .arg(message_id)
            .arg(conv.as_str())
            .arg(now_ms())
            .arg(dead_entry)
            .invoke(&mut conn)
            .await?;
        match reply.first().map(as_string).transpose()?.as_deref() {
            Some("ok") => Ok(Redriven::Queued {
                position: reply.get(1).map(super::as_u64).transpose()?.unwrap_or(1),
            }),
            Some("absent") => Ok(Redriven::Absent),
            Some("no_body") => Ok(Redriven::NoBody),
            Some("not_failed") => Ok(Redriven::NotFailed(
                reply.get(1).map(as_string).transpose()?.unwrap_or_default(),
            )),
            other => Err(QueueError::Protocol(format!("redrive returned {other:?}"))),
        }
    }

    /// Records a callback redelivered by hand on its message.
    pub async fn callback_redelivered(
        &self,
        message_id: &str,
        attempts: u32,
    ) -> Result<(), QueueError> {
        let mut conn = self.conn().await?;
        let _: () = redis::pipe()
            .hset(self.keys.message(message_id), "callback", "delivered")
            .hincr(self.keys.message(message_id), "callback_attempts", attempts)
            .hincr(self.keys.stats(), "callbacks_delivered_total", 1)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Holds a conversation: it keeps accepting messages and lets its running turn finish,
    /// but starts nothing until resumed. `by` names who held it.
    pub async fn hold(&self, conversation: &Conversation, by: &str) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let note = serde_json::json!({"by": by, "at": now_ms()}).to_string();
        let added: i64 = conn
            .hset(self.keys.held(), conversation.as_str(), note)
            .await?;
        Ok(added == 1)
    }

    /// Resumes a held conversation; `false` when it was not held.
    pub async fn resume(&self, conversation: &Conversation) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let was: i64 = Call::new(&self.scripts.resume, 3)
            .key(self.keys.held())
            .key(self.keys.conversation(conversation))
            .key(self.keys.ready())
            .arg(conversation.as_str())
            .arg(now_ms())
            .invoke(&mut conn)
            .await?;
        Ok(was == 1)
    }

    /// Pauses every drainer (`by` names who): they start nothing new; running turns finish.
    pub async fn pause_drainers(&self, by: &str) -> Result<(), QueueError> {
        let mut conn = self.conn().await?;
        let note = serde_json::json!({"by": by, "at": now_ms()}).to_string();
        let _: () = conn.set(self.keys.paused(), note).await?;
        Ok(())
    }

    /// Lets the drainers start turns again; `false` when they were not paused.
    pub async fn resume_drainers(&self) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let removed: i64 = conn.del(self.keys.paused()).await?;
        Ok(removed == 1)
    }

    /// Operators' figures: whether drainers are paused (who, when), how many conversations
    /// are held, and the enqueue time of the oldest unfinished message.
    pub async fn operations(&self) -> Result<Operations, QueueError> {
        let (paused, held, oldest): (Option<String>, u64, Vec<(String, f64)>) =
            read!(self, |conn| redis::pipe()
                .get(self.keys.paused())
                .hlen(self.keys.held())
                .zrange_withscores(self.keys.oldest(), 0, 0)
                .query_async(&mut conn)
                .await?)?;
        Ok(Operations {
            paused: paused.and_then(|p| serde_json::from_str(&p).ok()),
            held,
            oldest_enqueued_at: oldest.first().map(|(_, s)| *s as u64),
        })
    }
}

/// See [`Queue::operations`].
#[derive(Debug, Clone, Serialize)]
pub struct Operations {
    pub paused: Option<Json>,
    pub held: u64,
    pub oldest_enqueued_at: Option<u64>,
}

/// One drainer in the drainer set, with the age of its last heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct DrainerBeat {
    pub drainer: String,
    pub heartbeat_age_ms: u64,
}

impl Queue {
    /// Every drainer in the drainer set, with the age of its heartbeat (on the Redis clock).
    pub async fn drainer_beats(&self) -> Result<Vec<DrainerBeat>, QueueError> {
        let (beats, time): (Vec<(String, f64)>, (u64, u64)) = read!(self, |conn| redis::pipe()
            .zrange_withscores(self.keys.drainers(), 0, -1)
            .cmd("TIME")
            .query_async(&mut conn)
            .await?)?;
        let now = time.0 * 1000 + time.1 / 1000;
        Ok(beats
            .into_iter()
            .map(|(drainer, at)| DrainerBeat {
                drainer,
                heartbeat_age_ms: now.saturating_sub(at as u64),
            })
            .collect())
    }
}
