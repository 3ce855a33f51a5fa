use std::{fmt, time::Duration};

use redis::{Arg, Cmd, Pipeline};

use super::spec::{self, BlockArg, CommandSpec, flags};

/// The canonical name given to commands missing from the command table (module commands,
/// typos), so metric labels stay a bounded set.
pub const UNKNOWN_COMMAND: &str = "UNKNOWN";
/// The canonical name of a plain pipeline.
pub const PIPELINE: &str = "PIPELINE";
/// The canonical name of an atomic (`MULTI`/`EXEC`) pipeline.
pub const TRANSACTION: &str = "MULTI";

/// How long a command may legitimately keep Redis from answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Blocking {
    /// Redis answers as soon as it has run the command.
    No,
    /// Redis may hold the reply for up to this long (`BLPOP k 5`, `XREAD BLOCK 5000`).
    For(Duration),
    /// Redis may hold the reply forever (`BLPOP k 0`, `WAIT 1 0`).
    Forever,
}

impl Blocking {
    /// Two block times one after the other, for a pipeline holding both: Redis runs a
    /// connection's commands in order, so each may block in turn (`BLPOP a 1` then
    /// `BLPOP b 1` may answer after 2 s).
    fn then(self, next: Blocking) -> Blocking {
        match (self, next) {
            (Blocking::Forever, _) | (_, Blocking::Forever) => Blocking::Forever,
            (Blocking::For(a), Blocking::For(b)) => Blocking::For(a.saturating_add(b)),
            (Blocking::For(d), Blocking::No) | (Blocking::No, Blocking::For(d)) => Blocking::For(d),
            (Blocking::No, Blocking::No) => Blocking::No,
        }
    }
}

/// What every layer needs to know about a request, computed once when it is built.
///
/// The flags come from a table generated from a real Redis 7 server's `COMMAND INFO`, and
/// Redis 8.12's for the commands added since (`tools/gen_command_table.py`), refined by
/// the arguments where they change the answer (`SET k v NX` is not idempotent, `XREAD`
/// blocks only with `BLOCK`). Of the modules Redis 8 has built in, the JSON commands are
/// in it too (with the flags the module registers them with); the others (`FT.SEARCH`,
/// `TS.GET`, `BF.EXISTS`) are [`UNKNOWN_COMMAND`], neither read-only nor idempotent.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_resilience::{Blocking, Request};
///
/// let get = Request::from(redis::cmd("GET").arg("k").to_owned());
/// assert_eq!(get.info().name(), "GET");
/// assert!(get.info().is_read_only() && get.info().is_idempotent());
///
/// let incr = Request::from(redis::cmd("INCR").arg("n").to_owned());
/// assert!(!incr.info().is_idempotent());
///
/// let blpop = Request::from(redis::cmd("BLPOP").arg("q").arg(2.5).to_owned());
/// assert_eq!(blpop.info().blocking(), Blocking::For(Duration::from_millis(2500)));
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    /// One word (the `name` field of the command's static entry): every layer moves the
    /// request, so its size counts.
    name: &'static &'static str,
    /// [`Blocking`] in one word: see [`BlockTime`].
    block: BlockTime,
    read_only: bool,
    idempotent: bool,
    reply_counts: bool,
    pubsub: bool,
    connection_state: bool,
}

impl fmt::Debug for CommandInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandInfo")
            .field("name", &self.name())
            .field("read_only", &self.read_only)
            .field("idempotent", &self.idempotent)
            .field("reply_counts_changes", &self.reply_counts)
            .field("pubsub", &self.pubsub)
            .field("changes_connection", &self.connection_state)
            .field("blocking", &self.blocking())
            .finish()
    }
}

/// A [`Blocking`] packed in a `u64`: 0 is `No`, `u64::MAX` is `Forever`, anything else
/// is `For` that many nanoseconds minus one. (A block of 584 years or more is `Forever`.)
#[derive(Clone, Copy, PartialEq, Eq)]
struct BlockTime(u64);

impl BlockTime {
    const NO: BlockTime = BlockTime(0);

    fn of(blocking: Blocking) -> BlockTime {
        match blocking {
            Blocking::No => BlockTime::NO,
            Blocking::Forever => BlockTime(u64::MAX),
            Blocking::For(duration) => u64::try_from(duration.as_nanos())
                .ok()
                .and_then(|nanos| nanos.checked_add(1))
                .filter(|packed| *packed != u64::MAX)
                .map_or(BlockTime(u64::MAX), BlockTime),
        }
    }

    fn get(self) -> Blocking {
        match self.0 {
            0 => Blocking::No,
            u64::MAX => Blocking::Forever,
            packed => Blocking::For(Duration::from_nanos(packed - 1)),
        }
    }
}

/// The names of requests that are not one command from the table, as `CommandInfo`
/// points at them.
static PIPELINE_NAME: &str = PIPELINE;
static TRANSACTION_NAME: &str = TRANSACTION;
static UNKNOWN_NAME: &str = UNKNOWN_COMMAND;

impl CommandInfo {
    /// The canonical upper-case name: `"GET"`, `"CONFIG GET"`, [`PIPELINE`],
    /// [`TRANSACTION`], or [`UNKNOWN_COMMAND`]. Always one of a bounded set.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The name behind one pointer, for futures that keep it and move through every
    /// layer above: half the size of the `&str`.
    pub(crate) fn name_ref(&self) -> &'static &'static str {
        self.name
    }

    /// The command only reads data (Redis flags it `readonly`); a pipeline is read-only
    /// only if every command in it is.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Sending it twice leaves the data as sending it once would, so it may be retried
    /// after an ambiguous failure. Counting replies can differ on a resend (`DEL` answers 1,
    /// then 0: see [`reply_counts_changes`](Self::reply_counts_changes)); forms whose
    /// reply is the point (`SET .. NX`, `INCR`) are not idempotent.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// An idempotent write whose reply counts what it changed (`DEL`, `UNLINK`, `SADD`,
    /// `SREM`, `HSET`, `HDEL`, `ZADD`, `ZREM`, `PFADD`, `XACK`, `EXPIRE`, `PERSIST`...):
    /// sent again after the first one ran, it leaves the same data but answers 0 where the
    /// first answered 1. An application that reads the count (`SADD` to tell a first
    /// sighting from a repeat) should not have these resent:
    /// [`RetryLayer::resend_counting_writes`](crate::retry::RetryLayer::resend_counting_writes).
    /// A pipeline's reply counts if any command's does.
    pub fn reply_counts_changes(&self) -> bool {
        self.reply_counts
    }

    /// The command belongs to pub/sub (`PUBLISH`, `SUBSCRIBE`, `PUBSUB ..`).
    pub fn is_pubsub(&self) -> bool {
        self.pubsub
    }

    /// The command changes the connection it runs on for the commands after it: its mode
    /// (`SUBSCRIBE`, `MONITOR`, `MULTI`, `WATCH`), its database (`SELECT`), its user or
    /// protocol (`AUTH`, `HELLO`, `RESET`), whether Redis answers (`CLIENT REPLY`),
    /// whether Redis tracks the keys it reads (`CLIENT TRACKING`, `CLIENT CACHING`) or
    /// whether it stays open (`QUIT`). A pipeline does if any command in it does. On a
    /// connection many callers share, that would change it under all of them, so
    /// [`RedisService`](crate::RedisService) refuses such requests.
    pub fn changes_connection(&self) -> bool {
        self.connection_state
    }

    /// How long Redis may hold the reply on purpose.
    pub fn blocking(&self) -> Blocking {
        self.block.get()
    }

    /// Shorthand for `blocking() != Blocking::No`.
    pub fn is_blocking(&self) -> bool {
        self.block != BlockTime::NO
    }

    /// Describes one command.
    pub fn of_cmd(cmd: &Cmd) -> CommandInfo {
        let mut args = simple_args(cmd);
        let Some(first) = args.next() else {
            return CommandInfo::unknown();
        };
        let Some(spec) = spec::lookup(first, args.next()) else {
            return CommandInfo::unknown();
        };
        let mut idempotent = spec.has(flags::IDEMPOTENT);
        if idempotent && spec.has(flags::REFINE_BY_ARGS) {
            idempotent = !has_conditional_option(spec, cmd);
        }
        CommandInfo {
            name: &spec.name,
            read_only: spec.has(flags::READ_ONLY),
            idempotent,
            reply_counts: spec.has(flags::REPLY_COUNTS),
            pubsub: spec.has(flags::PUBSUB),
            connection_state: spec.has(flags::CONNECTION_STATE),
            block: BlockTime::of(block_time(spec.block, cmd)),
        }
    }

    /// Describes a pipeline: read-only and idempotent only if every command is, pub/sub
    /// if any is, blocking for as long as its longest-blocking command (a transaction
    /// never blocks: Redis does not let commands inside `MULTI` wait).
    pub fn of_pipeline(pipeline: &Pipeline) -> CommandInfo {
        let mut info = CommandInfo {
            name: if pipeline.is_transaction() {
                &TRANSACTION_NAME
            } else {
                &PIPELINE_NAME
            },
            read_only: true,
            idempotent: true,
            reply_counts: false,
            pubsub: false,
            connection_state: false,
            block: BlockTime::NO,
        };
        let mut blocking = Blocking::No;
        for cmd in pipeline.cmd_iter() {
            let one = CommandInfo::of_cmd(cmd);
            info.read_only &= one.read_only;
            info.idempotent &= one.idempotent;
            info.reply_counts |= one.reply_counts;
            info.pubsub |= one.pubsub;
            info.connection_state |= one.connection_state;
            blocking = blocking.then(one.blocking());
        }
        // Inside `MULTI` Redis runs blocking commands without waiting (`BLPOP` on an
        // empty list answers nil at once), so a transaction never blocks.
        if !pipeline.is_transaction() {
            info.block = BlockTime::of(blocking);
        }
        info
    }

    fn unknown() -> CommandInfo {
        CommandInfo {
            name: &UNKNOWN_NAME,
            read_only: false,
            idempotent: false,
            reply_counts: false,
            pubsub: false,
            connection_state: false,
            block: BlockTime::NO,
        }
    }
}

/// The canonical name of a command given as text (`"get"`, `"config  set"`), as
/// [`CommandInfo::name`] would give it, or `None` when no request can carry that name.
pub(crate) fn canonical_name(text: &str) -> Option<&'static str> {
    let mut words = text.split_whitespace();
    let first = words.next()?;
    let second = words.next();
    if words.next().is_some() {
        return None;
    }
    if second.is_none() {
        for special in [PIPELINE, TRANSACTION, UNKNOWN_COMMAND] {
            if first.eq_ignore_ascii_case(special) {
                return Some(special);
            }
        }
    }
    let spec = spec::lookup(first.as_bytes(), second.map(str::as_bytes))?;
    // A container with an unknown subcommand answers its own entry: not a match.
    let exact = second.is_none_or(|second| spec.name.len() == first.len() + 1 + second.len());
    exact.then_some(spec.name)
}

/// A command's arguments, its name included (not a SCAN cursor's placeholder).
pub(crate) fn simple_args(cmd: &Cmd) -> impl Iterator<Item = &[u8]> + Clone {
    // The other kind of argument is a SCAN cursor placeholder, never a word we look for.
    cmd.args_iter().filter_map(|arg| match arg {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    })
}

/// `SET k v NX|XX|GET|IFEQ v|...` and `ZADD k .. INCR ..` answer something a resend
/// would change.
fn has_conditional_option(spec: &CommandSpec, cmd: &Cmd) -> bool {
    let is = |arg: &[u8], word: &str| arg.eq_ignore_ascii_case(word.as_bytes());
    match spec.name {
        // SET key value [options]: every argument after the value is an option word, an
        // option's number, or the value an IFEQ/IFNE compares with (Redis 8.4). Only that
        // last can be mistaken for an option word, and it comes after one that already
        // makes the answer conditional.
        "SET" => simple_args(cmd).skip(3).any(|arg| {
            ["NX", "XX", "GET", "IFEQ", "IFNE", "IFDEQ", "IFDNE"]
                .iter()
                .any(|word| is(arg, word))
        }),
        // ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member ...: options precede the first
        // score, so stop there; a member may well be called "INCR".
        "ZADD" => simple_args(cmd)
            .skip(2)
            .take_while(|arg| {
                ["NX", "XX", "GT", "LT", "CH", "INCR"]
                    .iter()
                    .any(|w| is(arg, w))
            })
            .any(|arg| is(arg, "INCR")),
        _ => false,
    }
}

fn block_time(block: BlockArg, cmd: &Cmd) -> Blocking {
    let args = simple_args(cmd);
    let number = |arg: Option<&[u8]>| -> Option<f64> {
        std::str::from_utf8(arg?).ok()?.trim().parse::<f64>().ok()
    };
    let (amount, unit) = match block {
        BlockArg::None => return Blocking::No,
        BlockArg::LastArgSeconds => (number(args.last()), 1.0),
        BlockArg::ArgSeconds(index) => (number(args.clone().nth(index)), 1.0),
        BlockArg::LastArgMillis => (number(args.last()), 1e-3),
        BlockArg::BlockOptionMillis => (number(xread_block_option(cmd)), 1e-3),
    };
    match amount {
        // A missing or malformed timeout makes Redis answer with an error at once.
        None => Blocking::No,
        Some(0.0) => Blocking::Forever,
        Some(amount) => match Duration::try_from_secs_f64(amount * unit) {
            Ok(duration) => Blocking::For(duration),
            Err(_) if amount.is_sign_positive() => Blocking::Forever,
            Err(_) => Blocking::No,
        },
    }
}

/// The argument after `BLOCK` in `XREAD [COUNT n] [BLOCK ms] STREAMS ..` or
/// `XREADGROUP GROUP g c [COUNT n] [BLOCK ms] [NOACK] STREAMS ..`.
fn xread_block_option(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = simple_args(cmd);
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"XREADGROUP") {
        // GROUP group consumer: the names may be anything, even "BLOCK".
        args.nth(2)?;
    }
    while let Some(arg) = args.next() {
        if arg.eq_ignore_ascii_case(b"BLOCK") {
            return args.next();
        }
        if arg.eq_ignore_ascii_case(b"COUNT") {
            args.next();
        } else if arg.eq_ignore_ascii_case(b"STREAMS") {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cmd;

    fn info(args: &[&str]) -> CommandInfo {
        let mut c = cmd(args[0]);
        for arg in &args[1..] {
            c.arg(*arg);
        }
        CommandInfo::of_cmd(&c)
    }

    #[test]
    fn block_times_survive_packing() {
        for blocking in [
            Blocking::No,
            Blocking::Forever,
            Blocking::For(Duration::ZERO),
            Blocking::For(Duration::from_nanos(1)),
            Blocking::For(Duration::from_millis(2500)),
            Blocking::For(Duration::from_nanos(u64::MAX - 2)),
        ] {
            assert_eq!(BlockTime::of(blocking).get(), blocking);
        }
        // Past what a u64 of nanoseconds holds (584 years): as good as forever.
        for beyond in [Duration::from_nanos(u64::MAX - 1), Duration::MAX] {
            assert_eq!(
                BlockTime::of(Blocking::For(beyond)).get(),
                Blocking::Forever
            );
        }
    }

    #[test]
    fn names_given_as_text_are_canonicalised_or_refused() {
        assert_eq!(canonical_name("get"), Some("GET"));
        assert_eq!(canonical_name(" config   Set "), Some("CONFIG SET"));
        assert_eq!(canonical_name("CONFIG"), Some("CONFIG"));
        assert_eq!(canonical_name("pipeline"), Some(PIPELINE));
        assert_eq!(canonical_name("MULTI"), Some(TRANSACTION));
        assert_eq!(canonical_name("unknown"), Some(UNKNOWN_COMMAND));
        for wrong in ["", "GETX", "CONFIG NOPE", "GET k", "CONFIG GET x"] {
            assert_eq!(canonical_name(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn reads_are_read_only_and_idempotent() {
        for args in [
            &["GET", "k"][..],
            &["hgetall", "h"],
            &["MGET", "a", "b"],
            &["EXISTS", "k"],
        ] {
            let i = info(args);
            assert!(i.is_read_only() && i.is_idempotent(), "{args:?}: {i:?}");
            assert_eq!(i.blocking(), Blocking::No);
        }
    }

    #[test]
    fn counters_and_list_pushes_are_not_idempotent() {
        for args in [
            &["INCR", "n"][..],
            &["INCRBY", "n", "2"],
            &["LPUSH", "l", "x"],
            &["HINCRBY", "h", "f", "1"],
            &["APPEND", "k", "x"],
            &["EVAL", "return 1", "0"],
            &["PUBLISH", "c", "m"],
            &["GETDEL", "k"],
        ] {
            let i = info(args);
            assert!(!i.is_idempotent() && !i.is_read_only(), "{args:?}: {i:?}");
        }
    }

    #[test]
    fn counting_writes_are_idempotent_and_say_their_reply_counts() {
        for args in [
            &["DEL", "k"][..],
            &["SADD", "s", "m"],
            &["HSET", "h", "f", "v"],
            &["ZADD", "z", "1", "m"],
            &["EXPIRE", "k", "10"],
            &["XACK", "s", "g", "1-0"],
        ] {
            let i = info(args);
            assert!(
                i.is_idempotent() && i.reply_counts_changes(),
                "{args:?}: {i:?}"
            );
        }
        for args in [
            &["SET", "k", "v"][..],
            &["MSET", "a", "1"],
            &["GETEX", "k", "EX", "10"],
            &["GET", "k"],
            &["INCR", "n"],
        ] {
            assert!(!info(args).reply_counts_changes(), "{args:?}");
        }
        let mut pipe = redis::pipe();
        pipe.set("a", 1).sadd("s", "m");
        assert!(CommandInfo::of_pipeline(&pipe).reply_counts_changes());
    }

    #[test]
    fn set_is_idempotent_unless_its_reply_is_conditional() {
        assert!(info(&["SET", "k", "v"]).is_idempotent());
        assert!(info(&["SET", "k", "v", "EX", "10"]).is_idempotent());
        assert!(
            info(&["SET", "nx", "nx"]).is_idempotent(),
            "key and value named NX"
        );
        assert!(!info(&["SET", "k", "v", "nx"]).is_idempotent());
        assert!(!info(&["SET", "k", "v", "PX", "10", "XX"]).is_idempotent());
        assert!(!info(&["SET", "k", "v", "GET"]).is_idempotent());
        // Redis 8.4's compare-and-set: a resend after the first ran answers nil, "not set".
        for condition in ["IFEQ", "ifne", "IFDEQ", "IFDNE"] {
            let i = info(&["SET", "k", "v", condition, "old", "EX", "10"]);
            assert!(!i.is_idempotent(), "{condition}");
        }
    }

    #[test]
    fn commands_newer_than_the_server_the_table_was_read_from_are_known() {
        // Redis 7.4's hash field expiration, 8.0's hash and vector set commands, 8.4's
        // DIGEST: reads fall back and retry; the writes as their replies allow.
        for args in [
            &["HTTL", "h", "FIELDS", "1", "f"][..],
            &["HPEXPIRETIME", "h", "FIELDS", "1", "f"],
            &["VSIM", "v", "ELE", "e"],
            &["DIGEST", "k"],
        ] {
            let i = info(args);
            assert!(i.is_read_only() && i.is_idempotent(), "{args:?}: {i:?}");
            assert_ne!(i.name(), UNKNOWN_COMMAND);
        }
        for args in [
            &["HEXPIRE", "h", "10", "FIELDS", "1", "f"][..],
            &["HPERSIST", "h", "FIELDS", "1", "f"],
            &["XDELEX", "s", "IDS", "1", "1-0"],
            &["VREM", "v", "e"],
        ] {
            let i = info(args);
            assert!(
                !i.is_read_only() && i.is_idempotent() && i.reply_counts_changes(),
                "{args:?}: {i:?}"
            );
        }
        // The JSON module's, built into Redis 8.
        let get = info(&["JSON.GET", "doc", "$.name"]);
        assert!(get.is_read_only() && get.is_idempotent(), "{get:?}");
        assert_eq!(get.name(), "JSON.GET");
        let del = info(&["JSON.DEL", "doc", "$.name"]);
        assert!(del.is_idempotent() && del.reply_counts_changes(), "{del:?}");
        let set = info(&["JSON.SET", "doc", "$", "{}", "NX"]);
        assert!(!set.is_idempotent() && !set.is_read_only(), "{set:?}");
        let hgetex = info(&["HGETEX", "h", "EX", "60", "FIELDS", "1", "f"]);
        assert!(hgetex.is_idempotent() && !hgetex.reply_counts_changes());
        for args in [
            &["HGETDEL", "h", "FIELDS", "1", "f"][..],
            &["HSETEX", "h", "FNX", "FIELDS", "1", "f", "v"],
            &["DELEX", "k", "IFEQ", "v"],
            &["MSETEX", "1", "k", "v", "NX"],
            &["INCREX", "k", "BYINT", "1"],
        ] {
            let i = info(args);
            assert!(!i.is_idempotent() && !i.is_read_only(), "{args:?}: {i:?}");
            assert_ne!(i.name(), UNKNOWN_COMMAND);
        }
    }

    #[test]
    fn zadd_is_idempotent_unless_incr() {
        assert!(info(&["ZADD", "z", "1", "m"]).is_idempotent());
        assert!(
            info(&["ZADD", "z", "NX", "CH", "1", "INCR"]).is_idempotent(),
            "member INCR"
        );
        assert!(!info(&["ZADD", "z", "XX", "INCR", "1", "m"]).is_idempotent());
    }

    #[test]
    fn block_times_come_from_the_right_argument() {
        let secs = |s: f64| Blocking::For(Duration::from_secs_f64(s));
        assert_eq!(info(&["BLPOP", "a", "b", "5"]).blocking(), secs(5.0));
        assert_eq!(info(&["brpop", "a", "0.25"]).blocking(), secs(0.25));
        assert_eq!(info(&["BLPOP", "a", "0"]).blocking(), Blocking::Forever);
        assert_eq!(
            info(&["BLMOVE", "a", "b", "LEFT", "RIGHT", "1"]).blocking(),
            secs(1.0)
        );
        assert_eq!(info(&["BZPOPMIN", "z", "3"]).blocking(), secs(3.0));
        assert_eq!(
            info(&["BLMPOP", "2", "1", "l", "LEFT"]).blocking(),
            secs(2.0)
        );
        assert_eq!(info(&["WAIT", "1", "1500"]).blocking(), secs(1.5));
        assert_eq!(info(&["WAIT", "1", "0"]).blocking(), Blocking::Forever);
        assert_eq!(info(&["WAITAOF", "1", "0", "2500"]).blocking(), secs(2.5));
        assert_eq!(
            info(&[
                "BLMOVEM", "a", "b", "LEFT", "RIGHT", "1.5", "COUNT", "9", "BULK"
            ])
            .blocking(),
            secs(1.5)
        );
        assert_eq!(
            info(&["BZMOVE", "a", "b", "MIN", "4", "COUNT", "2"]).blocking(),
            secs(4.0)
        );
        assert_eq!(info(&["BLPOP", "a", "soon"]).blocking(), Blocking::No);
        assert_eq!(info(&["BLPOP", "a", "-1"]).blocking(), Blocking::No);
    }

    #[test]
    fn xread_blocks_only_with_the_block_option() {
        assert_eq!(
            info(&["XREAD", "STREAMS", "s", "0"]).blocking(),
            Blocking::No
        );
        assert_eq!(
            info(&["XREAD", "COUNT", "10", "BLOCK", "2000", "STREAMS", "s", "$"]).blocking(),
            Blocking::For(Duration::from_secs(2))
        );
        assert_eq!(
            info(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]).blocking(),
            Blocking::Forever
        );
        assert_eq!(
            info(&["XREADGROUP", "GROUP", "BLOCK", "BLOCK", "STREAMS", "s", ">"]).blocking(),
            Blocking::No,
            "group and consumer named BLOCK"
        );
        assert_eq!(
            info(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "BLOCK",
                "100",
                "STREAMS",
                "s",
                ">"
            ])
            .blocking(),
            Blocking::For(Duration::from_millis(100))
        );
    }

    #[test]
    fn subcommands_have_their_own_names_and_flags() {
        let get = info(&["CONFIG", "GET", "maxmemory"]);
        assert_eq!(get.name(), "CONFIG GET");
        assert!(get.is_idempotent());
        assert_eq!(info(&["client", "setname", "x"]).name(), "CLIENT SETNAME");
        assert_eq!(info(&["CLIENT", "KILL", "ID", "1"]).name(), "CLIENT KILL");
        assert!(!info(&["CLIENT", "KILL", "ID", "1"]).is_idempotent());
        assert_eq!(info(&["CONFIG"]).name(), "CONFIG");
    }

    #[test]
    fn unknown_commands_share_one_name_and_are_treated_as_unsafe() {
        let i = info(&["FT.SEARCH", "idx", "*"]);
        assert_eq!(i.name(), UNKNOWN_COMMAND);
        assert!(!i.is_idempotent() && !i.is_read_only());
        assert_eq!(CommandInfo::of_cmd(&Cmd::new()).name(), UNKNOWN_COMMAND);
    }

    #[test]
    fn pubsub_commands_are_flagged() {
        assert!(info(&["PUBLISH", "c", "m"]).is_pubsub());
        assert!(info(&["SUBSCRIBE", "c"]).is_pubsub());
        assert!(!info(&["GET", "k"]).is_pubsub());
    }

    #[test]
    fn commands_that_change_the_connection_are_marked() {
        for args in [
            &["SUBSCRIBE", "c"][..],
            &["psubscribe", "c*"],
            &["SELECT", "2"],
            &["MULTI"],
            &["EXEC"],
            &["WATCH", "k"],
            &["AUTH", "pw"],
            &["HELLO", "3"],
            &["RESET"],
            &["QUIT"],
            &["MONITOR"],
            &["CLIENT", "REPLY", "OFF"],
            &["CLIENT", "TRACKING", "ON", "BCAST"],
            &["client", "caching", "yes"],
        ] {
            assert!(info(args).changes_connection(), "{args:?}");
        }
        for args in [
            &["GET", "k"][..],
            &["PUBLISH", "c", "m"],
            &["CLIENT", "SETNAME", "app"],
            &["SWAPDB", "0", "1"],
        ] {
            assert!(!info(args).changes_connection(), "{args:?}");
        }
        let mut pipe = redis::pipe();
        pipe.get("k").cmd("SELECT").arg(2);
        assert!(CommandInfo::of_pipeline(&pipe).changes_connection());
        let mut atomic = redis::pipe();
        atomic.atomic().get("k").set("k", 1);
        assert!(
            !CommandInfo::of_pipeline(&atomic).changes_connection(),
            "the MULTI and EXEC of an atomic pipeline are not commands of it"
        );
    }

    #[test]
    fn pipeline_is_read_only_only_if_every_command_is() {
        let mut reads = redis::pipe();
        reads.get("a").get("b");
        let i = CommandInfo::of_pipeline(&reads);
        assert_eq!(i.name(), PIPELINE);
        assert!(i.is_read_only() && i.is_idempotent());

        let mut mixed = redis::pipe();
        mixed.atomic().get("a").incr("n", 1);
        let i = CommandInfo::of_pipeline(&mixed);
        assert_eq!(i.name(), TRANSACTION);
        assert!(!i.is_read_only() && !i.is_idempotent());

        let mut blocking = redis::pipe();
        blocking
            .cmd("BLPOP")
            .arg("q")
            .arg(1)
            .cmd("BLPOP")
            .arg("q")
            .arg(3);
        assert_eq!(
            CommandInfo::of_pipeline(&blocking).blocking(),
            Blocking::For(Duration::from_secs(4)),
            "Redis runs them in turn, so each may block"
        );
        blocking.cmd("BLPOP").arg("q").arg(0);
        assert_eq!(
            CommandInfo::of_pipeline(&blocking).blocking(),
            Blocking::Forever
        );
        assert_eq!(
            CommandInfo::of_pipeline(blocking.atomic()).blocking(),
            Blocking::No,
            "a transaction never blocks"
        );
    }
}
