//! The Lua scripts, loaded from `lua/*.lua`; each file's header names its KEYS, ARGV and return.
//!
//! Constants a script passes to `redis.call` are written as strings (`'1'`, `'0'`), not Lua
//! numbers: Redis 7.0 formats every number argument with `snprintf("%.17g")`, which made a
//! `HINCRBY` by `1` about half again as costly as by `'1'` (`docs/performance.md`, item 18).

use redis::Script;

/// Every script the broker runs, hashed once at start-up (`EVALSHA`, falling back to `EVAL`).
#[derive(Debug, Clone)]
pub struct Scripts {
    pub enqueue: Script,
    pub claim: Script,
    pub finish: Script,
    pub release: Script,
    pub heartbeat: Script,
    pub expired: Script,
    pub forget: Script,
    pub health: Script,
    pub cancel: Script,
    pub event: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            enqueue: Script::new(include_str!("../lua/enqueue.lua")),
            claim: Script::new(include_str!("../lua/claim.lua")),
            finish: Script::new(include_str!("../lua/finish.lua")),
            release: Script::new(include_str!("../lua/release.lua")),
            heartbeat: Script::new(include_str!("../lua/heartbeat.lua")),
            expired: Script::new(include_str!("../lua/expired.lua")),
            forget: Script::new(include_str!("../lua/forget.lua")),
            health: Script::new(include_str!("../lua/health.lua")),
            cancel: Script::new(include_str!("../lua/cancel.lua")),
            event: Script::new(include_str!("../lua/event.lua")),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
