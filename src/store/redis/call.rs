//! The store's Lua scripts, called with their keys and arguments written straight into the
//! command. `redis::ScriptInvocation` copies each key and each argument into a buffer of its
//! own before packing them into the command: an admission (ten keys, twenty-five arguments) cost
//! three dozen allocations before it left the process. A call here is one buffer, written once:
//! `EVALSHA <sha1> <number of keys>`, then the keys, then the arguments.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs};

/// A Lua script, called by its SHA1 (`EVALSHA`) and loaded when Redis does not know it
/// (`NOSCRIPT`: a restarted or failed-over Redis), as `redis::Script` does.
#[derive(Clone)]
pub(super) struct Lua(Script);

impl Lua {
    pub(super) fn new(code: &str) -> Lua {
        Lua(Script::new(code))
    }

    /// A call with one key.
    pub(super) fn key(&self, key: impl AsRef<str>) -> Call<'_> {
        let mut call = self.call(1);
        call.key(key);
        call
    }

    /// A call with these keys.
    pub(super) fn keys<T: AsRef<str>>(&self, keys: &[T]) -> Call<'_> {
        let mut call = self.call(keys.len());
        for key in keys {
            call.key(key.as_ref());
        }
        call
    }

    /// A call that takes `keys` keys, each added by [`Call::key`] before any argument.
    pub(super) fn call(&self, keys: usize) -> Call<'_> {
        // Room for an admission: ten keys of about 60 bytes and 26 short arguments.
        let mut cmd = Cmd::with_capacity(3 + keys + 28, 1024);
        cmd.arg("EVALSHA").arg(self.0.get_hash()).arg(keys);
        Call {
            script: &self.0,
            cmd,
            keys_left: keys,
        }
    }
}

/// One call of a script: the whole command, keys (`KEYS`) then arguments (`ARGV`).
pub(super) struct Call<'a> {
    script: &'a Script,
    cmd: Cmd,
    /// Keys announced and not yet written.
    keys_left: usize,
}

impl Call<'_> {
    /// Adds the next key (one only: `EVALSHA` counted them).
    pub(super) fn key(&mut self, key: impl AsRef<str>) -> &mut Self {
        assert!(self.keys_left > 0, "more keys than the call announced");
        self.keys_left -= 1;
        self.cmd.arg(key.as_ref());
        self
    }

    /// Adds an argument (or, for a collection, each of its items), after every key.
    pub(super) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        assert_eq!(
            self.keys_left, 0,
            "a script's keys come before its arguments"
        );
        self.cmd.arg(arg);
        self
    }

    /// Runs the script, loading it first if Redis does not know it.
    pub(super) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        assert_eq!(self.keys_left, 0, "fewer keys than the call announced");
        match self.cmd.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            answer => answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command is `EVALSHA` with the script's SHA1, the number of keys, the keys and the
    /// arguments, in the order `redis::Script` sends them.
    #[test]
    fn a_call_packs_the_command_redis_script_packs() {
        let code = "return {KEYS[1], ARGV[2]}";
        let script = Script::new(code);
        let lua = Lua::new(code);
        let mut ours = lua.keys(&["k1", "k2"]);
        ours.arg("a").arg(42_u64).arg(b"\x00\xff".as_slice());
        let expected = Cmd::new()
            .arg("EVALSHA")
            .arg(script.get_hash())
            .arg(2)
            .arg(&["k1", "k2"])
            .arg("a")
            .arg(42_u64)
            .arg(b"\x00\xff".as_slice())
            .get_packed_command();
        assert_eq!(ours.cmd.get_packed_command(), expected);
        let mut one = lua.key("k1");
        one.arg("a");
        let expected = Cmd::new()
            .arg("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg("k1")
            .arg("a")
            .get_packed_command();
        assert_eq!(one.cmd.get_packed_command(), expected);
    }

    /// A key after an argument would be read as an argument by the script: refused.
    #[test]
    #[should_panic(expected = "keys come before its arguments")]
    fn a_key_announced_but_not_written_before_the_arguments_is_refused() {
        let lua = Lua::new("return 1");
        lua.call(2).key("k1").arg("a");
    }
}
