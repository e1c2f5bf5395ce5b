//! The store's Lua scripts, called with their keys and arguments written straight into command
//! buffers. `redis::ScriptInvocation` copies each key and each argument into a buffer of its
//! own before packing them into the command: an admission (ten keys, twenty-five arguments) cost
//! three dozen allocations before it left the process.

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

    /// A call with `key` as its first key.
    pub(super) fn key<T: ToRedisArgs>(&self, key: T) -> Call<'_> {
        let mut call = self.call();
        call.key(key);
        call
    }

    /// A call with no keys yet.
    pub(super) fn call(&self) -> Call<'_> {
        Call {
            script: &self.0,
            keys: Cmd::with_capacity(12, 512),
            args: Cmd::with_capacity(28, 256),
        }
    }
}

/// One call of a script: its keys (`KEYS`) and arguments (`ARGV`), each in one buffer.
pub(super) struct Call<'a> {
    script: &'a Script,
    keys: Cmd,
    args: Cmd,
}

impl Call<'_> {
    /// Adds a key (or, for a collection, each of its items).
    pub(super) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.arg(key);
        self
    }

    /// Adds an argument (or, for a collection, each of its items).
    pub(super) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.arg(arg);
        self
    }

    /// Runs the script, loading it first if Redis does not know it.
    pub(super) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        let cmd = self.command();
        match cmd.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                cmd.query_async(conn).await
            }
            answer => answer,
        }
    }

    /// `EVALSHA <sha1> <number of keys> <keys…> <arguments…>`.
    fn command(&self) -> Cmd {
        let (keys, args) = (self.keys.args_iter(), self.args.args_iter());
        let bytes = |c: &Cmd| c.args_iter().map(|a| bytes_of(&a).len()).sum::<usize>();
        let mut cmd = Cmd::with_capacity(
            3 + keys.len() + args.len(),
            64 + bytes(&self.keys) + bytes(&self.args),
        );
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(keys.len());
        for part in keys.chain(args) {
            cmd.arg(bytes_of(&part));
        }
        cmd
    }
}

/// An argument's bytes (only a scan's cursor is not bytes, and a script call has none).
fn bytes_of<'a>(arg: &redis::Arg<&'a [u8]>) -> &'a [u8] {
    match arg {
        redis::Arg::Simple(bytes) => bytes,
        _ => b"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command is `EVALSHA` with the script's SHA1, the number of keys, the keys and the
    /// arguments, in the order `redis::Script` sends them, keys added late included.
    #[test]
    fn a_call_packs_the_command_redis_script_packs() {
        let code = "return {KEYS[1], ARGV[2]}";
        let script = Script::new(code);
        let lua = Lua::new(code);
        let mut ours = lua.key(&["k1", "k2"]);
        ours.arg("a")
            .arg(42_u64)
            .key("k3")
            .arg(b"\x00\xff".as_slice());
        let expected = Cmd::new()
            .arg("EVALSHA")
            .arg(script.get_hash())
            .arg(3)
            .arg(&["k1", "k2", "k3"])
            .arg("a")
            .arg(42_u64)
            .arg(b"\x00\xff".as_slice())
            .get_packed_command();
        assert_eq!(ours.command().get_packed_command(), expected);
    }
}
