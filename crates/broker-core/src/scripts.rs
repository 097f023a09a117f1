//! The Lua scripts, loaded from `lua/*.lua`; each file's header names its KEYS, ARGV and return.
//! The two that record a stream message's frames (event, finish) start with `told.lua`, which
//! writes what the message's reply channel hears of them.
//!
//! Constants a script passes to `redis.call` are written as strings (`'1'`, `'0'`), not Lua
//! numbers: Redis 7.0 formats every number argument with `snprintf("%.17g")` first, which
//! makes a `HINCRBY` by `1` measurably costlier than by `'1'`.

use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, RedisResult, Script, ToRedisArgs};

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
    pub progress: Script,
    pub redrive: Script,
    pub resume: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            enqueue: Script::new(include_str!("../lua/enqueue.lua")),
            claim: Script::new(include_str!("../lua/claim.lua")),
            finish: Script::new(concat!(
                include_str!("../lua/told.lua"),
                include_str!("../lua/finish.lua")
            )),
            release: Script::new(include_str!("../lua/release.lua")),
            heartbeat: Script::new(include_str!("../lua/heartbeat.lua")),
            expired: Script::new(include_str!("../lua/expired.lua")),
            forget: Script::new(include_str!("../lua/forget.lua")),
            health: Script::new(include_str!("../lua/health.lua")),
            cancel: Script::new(include_str!("../lua/cancel.lua")),
            event: Script::new(concat!(
                include_str!("../lua/told.lua"),
                include_str!("../lua/event.lua")
            )),
            progress: Script::new(include_str!("../lua/progress.lua")),
            redrive: Script::new(include_str!("../lua/redrive.lua")),
            resume: Script::new(include_str!("../lua/resume.lua")),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

/// One call of a script by its hash (`EVALSHA`), falling back to loading it when Redis does
/// not know it (a restart, `SCRIPT FLUSH`).
///
/// Keys and arguments are written straight into the command's one buffer. `redis`'s own
/// `ScriptInvocation` keeps each in a vector of its own and copies them all into a command
/// when it is sent, several allocations more per message.
pub struct Call<'s> {
    script: &'s Script,
    cmd: Cmd,
    /// Keys still to come; arguments may follow only when it is 0.
    keys_left: usize,
    misordered: bool,
}

impl<'s> Call<'s> {
    /// A call of `script` with `keys` keys, which come first.
    pub fn new(script: &'s Script, keys: usize) -> Self {
        let mut cmd = Cmd::with_capacity(keys + 16, 512);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        Self {
            script,
            cmd,
            keys_left: keys,
            misordered: false,
        }
    }

    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        match self.keys_left.checked_sub(1) {
            Some(left) => self.keys_left = left,
            None => self.misordered = true,
        }
        self.cmd.arg(key);
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.misordered |= self.keys_left > 0;
        self.cmd.arg(arg);
        self
    }

    /// The `EVALSHA` command, for a pipeline; its caller handles a `NOSCRIPT` answer.
    pub fn cmd(&self) -> RedisResult<&Cmd> {
        if self.misordered || self.keys_left > 0 {
            return Err(RedisError::from((
                ErrorKind::Client,
                "script call with keys and arguments out of order",
            )));
        }
        Ok(&self.cmd)
    }

    /// Sends the call; on `NOSCRIPT`, loads the script and sends it once more.
    pub async fn invoke<T, C>(&self, conn: &mut C) -> RedisResult<T>
    where
        T: FromRedisValue,
        C: redis::aio::ConnectionLike,
    {
        let cmd = self.cmd()?;
        match cmd.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                cmd.query_async(conn).await
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(call: &Call<'_>) -> Vec<String> {
        call.cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect()
    }

    #[test]
    fn a_call_is_evalsha_with_its_key_count_keys_and_arguments() {
        let script = Script::new("return 1");
        let mut call = Call::new(&script, 2);
        call.key("k1").key("k2").arg("a").arg(7_u64);
        assert_eq!(
            args(&call),
            ["EVALSHA", script.get_hash(), "2", "k1", "k2", "a", "7"]
        );
        assert!(call.cmd().is_ok());
    }

    #[test]
    fn keys_and_arguments_out_of_order_are_refused_before_sending() {
        let script = Script::new("return 1");
        let too_few = {
            let mut call = Call::new(&script, 2);
            call.key("k1");
            call.cmd().is_err()
        };
        let arg_first = {
            let mut call = Call::new(&script, 1);
            call.arg("a").key("k1");
            call.cmd().is_err()
        };
        let too_many = {
            let mut call = Call::new(&script, 1);
            call.key("k1").key("k2");
            call.cmd().is_err()
        };
        assert!(too_few && arg_first && too_many);
    }
}
