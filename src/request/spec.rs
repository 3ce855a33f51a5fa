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
    /// The first 8 bytes of `key`, big-endian and zero-padded: ordered like `key`, so
    /// the search compares one integer per step.
    prefix: u64,
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
    pub const fn new(
        key: &'static str,
        name: &'static str,
        flags: u8,
        block: BlockArg,
        subcommands: &'static [CommandSpec],
    ) -> CommandSpec {
        CommandSpec {
            prefix: prefix(key.as_bytes()),
            key,
            name,
            flags,
            block,
            subcommands,
        }
    }

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
    let word_prefix = runtime_prefix(word);
    specs
        .binary_search_by(|spec| {
            spec.prefix.cmp(&word_prefix).then_with(|| {
                let key = spec.key.as_bytes();
                if key.len() <= 8 && word.len() <= 8 {
                    // Same first 8 bytes: only a NUL in the word (not padding) differs.
                    key.len().cmp(&word.len())
                } else {
                    // Keys sharing their first 8 bytes: ZRANGEBYSCORE, ZRANGEBYLEX.
                    cmp_upper(key, word)
                }
            })
        })
        .ok()
        .map(|index| &specs[index])
}

/// The first 8 bytes, upper-cased, big-endian, zero-padded: integer order is the order of
/// the words. For the table, at compile time.
const fn prefix(word: &[u8]) -> u64 {
    let mut packed = 0u64;
    let mut i = 0;
    while i < 8 {
        let byte = if i < word.len() {
            word[i].to_ascii_uppercase()
        } else {
            0
        };
        packed = (packed << 8) | byte as u64;
        i += 1;
    }
    packed
}

/// [`prefix`] for a request's word: one copy, and all 8 bytes upper-cased at once.
fn runtime_prefix(word: &[u8]) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut bytes = [0u8; 8];
    let n = word.len().min(8);
    bytes[..n].copy_from_slice(&word[..n]);
    let packed = u64::from_be_bytes(bytes);
    // High bit of each byte: set where the byte is >= 'a', and where it is > 'z'
    // (computed on 7 bits so no byte carries into its neighbour).
    let seven = packed & !HIGH;
    let at_least_a = seven + 0x1f1f_1f1f_1f1f_1f1f;
    let above_z = seven + 0x0505_0505_0505_0505;
    let lower = at_least_a & !above_z & !packed & HIGH;
    packed - (lower >> 2)
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
    fn runtime_prefix_agrees_with_the_compile_time_one() {
        let mut words: Vec<Vec<u8>> = Vec::new();
        for spec in super::super::table::COMMANDS {
            words.push(spec.key.as_bytes().to_vec());
            words.push(spec.key.to_ascii_lowercase().into_bytes());
        }
        // Every byte value in every position, including the ones around 'a' and 'z'.
        for byte in 0..=255u8 {
            for at in 0..9 {
                let mut word = b"sEt@`{zZ".to_vec();
                if at < 8 {
                    word[at] = byte;
                } else {
                    word.push(byte);
                }
                words.push(word);
            }
        }
        for word in &words {
            assert_eq!(runtime_prefix(word), prefix(word), "{word:?}");
        }
    }

    #[test]
    fn words_with_a_shared_eight_byte_prefix_are_told_apart() {
        assert_eq!(
            lookup(b"zrangebyscore", None).map(|s| s.name),
            Some("ZRANGEBYSCORE")
        );
        assert_eq!(
            lookup(b"ZRANGEBYLEX", None).map(|s| s.name),
            Some("ZRANGEBYLEX")
        );
        assert_eq!(
            lookup(b"GEORADIUSBYMEMBER_RO", None).map(|s| s.name),
            Some("GEORADIUSBYMEMBER_RO")
        );
        assert!(lookup(b"ZRANGEBYNOTHING", None).is_none());
        assert!(
            lookup(b"GET\0", None).is_none(),
            "a NUL byte is not padding"
        );
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
