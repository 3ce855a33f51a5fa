//! The static description of Redis commands that `table.rs` (generated) is made of, and
//! the lookup from a command's first arguments to its entry.

use std::cmp::Ordering;

/// Bit flags of a [`CommandSpec`].
pub(super) mod flags {
    /// The server flags it `readonly` (and not `write`).
    pub const READ_ONLY: u8 = 1 << 0;
    /// The server flags it `write`.
    pub const WRITE: u8 = 1 << 1;
    /// Sending it twice leaves the data as sending it once would.
    pub const IDEMPOTENT: u8 = 1 << 2;
    /// The server flags it `pubsub`.
    pub const PUBSUB: u8 = 1 << 3;
    /// Idempotency depends on the arguments (`SET ... NX`, `ZADD ... INCR`).
    pub const REFINE_BY_ARGS: u8 = 1 << 4;
}

/// Where a blocking command carries its block timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockArg {
    None,
    /// `BLPOP key [key ...] timeout`: seconds as a double, 0 blocks forever.
    LastArgSeconds,
    /// `BLMPOP timeout numkeys ...`: seconds as a double, 0 blocks forever.
    FirstArgSeconds,
    /// `WAIT numreplicas timeout`: milliseconds, 0 blocks forever.
    LastArgMillis,
    /// `XREAD [COUNT n] [BLOCK ms] STREAMS ...`: blocks only with the option; 0 is forever.
    BlockOptionMillis,
}

#[derive(Debug)]
pub(super) struct CommandSpec {
    /// The upper-case word that selects this entry (`"GET"`; `"GET"` too for `CONFIG GET`).
    pub key: &'static str,
    /// The canonical name used in errors and metrics (`"GET"`, `"CONFIG GET"`).
    pub name: &'static str,
    pub flags: u8,
    pub block: BlockArg,
    /// Sorted by `key`; empty unless this is a container command (CONFIG, CLIENT, ...).
    pub subcommands: &'static [CommandSpec],
}

impl CommandSpec {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Finds the entry for a command given its first two arguments. A container command with
/// an unknown or missing subcommand answers its own entry, which carries no flags.
pub(super) fn lookup(name: &[u8], sub: Option<&[u8]>) -> Option<&'static CommandSpec> {
    let spec = find(super::table::COMMANDS, name)?;
    if spec.subcommands.is_empty() {
        return Some(spec);
    }
    Some(
        sub.and_then(|sub| find(spec.subcommands, sub))
            .unwrap_or(spec),
    )
}

fn find(specs: &'static [CommandSpec], word: &[u8]) -> Option<&'static CommandSpec> {
    specs
        .binary_search_by(|spec| cmp_upper(spec.key.as_bytes(), word))
        .ok()
        .map(|index| &specs[index])
}

/// Compares an upper-case key with a word of any case, without allocating.
fn cmp_upper(key: &[u8], word: &[u8]) -> Ordering {
    let common = key.len().min(word.len());
    for (k, w) in key[..common].iter().zip(&word[..common]) {
        match k.cmp(&w.to_ascii_uppercase()) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    key.len().cmp(&word.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_so_binary_search_finds_every_entry() {
        for spec in super::super::table::COMMANDS {
            assert_eq!(
                lookup(spec.key.as_bytes(), None).map(|s| s.name),
                Some(spec.name)
            );
            for sub in spec.subcommands {
                let found = lookup(spec.key.as_bytes(), Some(sub.key.as_bytes()));
                assert_eq!(found.map(|s| s.name), Some(sub.name));
            }
        }
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown_words() {
        assert_eq!(lookup(b"gEt", None).map(|s| s.name), Some("GET"));
        assert_eq!(
            lookup(b"config", Some(b"set")).map(|s| s.name),
            Some("CONFIG SET")
        );
        assert_eq!(
            lookup(b"CONFIG", Some(b"nope")).map(|s| s.name),
            Some("CONFIG")
        );
        assert_eq!(lookup(b"CONFIG", None).map(|s| s.name), Some("CONFIG"));
        assert!(lookup(b"JSON.GET", None).is_none());
        assert!(lookup(b"", None).is_none());
        assert!(lookup(b"GETX", None).is_none());
    }
}
