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
    /// Changes the connection it runs on for the commands after it (`SELECT`, `MULTI`,
    /// `SUBSCRIBE`...).
    pub const CONNECTION_STATE: u8 = 1 << 5;
    /// Idempotent, but its reply counts what it changed (`DEL`, `SADD`): a resend after
    /// the first ran answers 0 where the first answered 1.
    pub const REPLY_COUNTS: u8 = 1 << 6;
}

/// Where a blocking command carries its block timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockArg {
    None,
    /// `BLPOP key [key ...] timeout`: seconds as a double, 0 blocks forever.
    LastArgSeconds,
    /// The argument at this index, the command's name being 0 (`BLMPOP timeout numkeys
    /// ...` is 1, `BZMOVE source destination MIN|MAX timeout` 4): seconds as a double, 0
    /// blocks forever.
    ArgSeconds(usize),
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
    let spec = COMMAND_INDEX.find(name)?;
    if spec.subcommands.is_empty() {
        return Some(spec);
    }
    Some(
        sub.and_then(|sub| find(spec.subcommands, sub))
            .unwrap_or(spec),
    )
}

/// Finds `word` in a sorted table of subcommands (a few dozen at most): a binary search.
fn find(specs: &'static [CommandSpec], word: &[u8]) -> Option<&'static CommandSpec> {
    let word_prefix = runtime_prefix(word);
    specs
        .binary_search_by(|spec| {
            spec.prefix
                .cmp(&word_prefix)
                .then_with(|| spec.cmp_key(word))
        })
        .ok()
        .map(|index| &specs[index])
}

impl CommandSpec {
    /// Orders this entry's key against a word with the same 8-byte prefix.
    fn cmp_key(&self, word: &[u8]) -> Ordering {
        let key = self.key.as_bytes();
        if key.len() <= 8 && word.len() <= 8 {
            // Same first 8 bytes: only a NUL in the word (not padding) differs.
            key.len().cmp(&word.len())
        } else {
            // Keys sharing their first 8 bytes: ZRANGEBYSCORE, ZRANGEBYLEX.
            cmp_upper(key, word)
        }
    }
}

/// Slots of [`COMMAND_INDEX`]: a power of two, at least eight times the commands (8 KiB),
/// so a lookup mostly reads one slot.
const INDEX_SLOTS: usize = (super::table::COMMANDS.len() * 8).next_power_of_two();

/// The top-level commands by the hash of their 8-byte prefix, built at compile time.
///
/// Every request's first word is looked up here (`Request::from` a `Cmd`), so it is a
/// hash table rather than a binary search of the ~320 commands: the search's eight
/// probes cost ~10 ns in mispredicted branches when warm, and as many cache lines when
/// cold, which a call on a quiet connection is. This reads one slot and one entry.
static COMMAND_INDEX: Index<INDEX_SLOTS> = Index::new(super::table::COMMANDS);

/// An open-addressing table (linear probing) of indexes into a sorted command table;
/// each prefix's slot holds the first of the entries sharing it, the others follow it.
struct Index<const SLOTS: usize> {
    specs: &'static [CommandSpec],
    slots: [u16; SLOTS],
}

impl<const SLOTS: usize> Index<SLOTS> {
    const EMPTY: u16 = u16::MAX;

    const fn new(specs: &'static [CommandSpec]) -> Self {
        assert!(SLOTS.is_power_of_two() && specs.len() < SLOTS && SLOTS <= u16::MAX as usize);
        let mut slots = [Self::EMPTY; SLOTS];
        let mut i = 0;
        while i < specs.len() {
            let prefix = specs[i].prefix;
            if i == 0 || specs[i - 1].prefix != prefix {
                let mut slot = Self::slot(prefix);
                while slots[slot] != Self::EMPTY {
                    slot = (slot + 1) % SLOTS;
                }
                slots[slot] = i as u16;
            }
            i += 1;
        }
        Index { specs, slots }
    }

    /// Fibonacci hashing: the top bits of the prefix times 2^64 / φ.
    const fn slot(prefix: u64) -> usize {
        let hash = prefix.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (hash >> (u64::BITS - SLOTS.trailing_zeros())) as usize % SLOTS
    }

    fn find(&self, word: &[u8]) -> Option<&'static CommandSpec> {
        let word_prefix = runtime_prefix(word);
        let mut slot = Self::slot(word_prefix);
        // The table is at most an eighth full, so an empty slot soon ends every probe.
        loop {
            let first = *self.slots.get(slot)?;
            if first == Self::EMPTY {
                return None;
            }
            let run = self.specs.get(usize::from(first)..)?;
            if run.first()?.prefix == word_prefix {
                return run
                    .iter()
                    .take_while(|spec| spec.prefix == word_prefix)
                    .find(|spec| spec.cmp_key(word) == Ordering::Equal);
            }
            slot = (slot + 1) % SLOTS;
        }
    }
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

/// [`prefix`] for a request's word: one load (or a short word's bytes shifted in), and
/// all 8 bytes upper-cased at once.
fn runtime_prefix(word: &[u8]) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Assembled in a register: a copy into a stack buffer read back as one word stalls
    // on store forwarding (~5 ns, a quarter of a lookup).
    let packed = match word.first_chunk::<8>() {
        Some(first) => u64::from_be_bytes(*first),
        None => word.iter().enumerate().fold(0, |packed, (i, byte)| {
            packed | u64::from(*byte) << (56 - 8 * i)
        }),
    };
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
    fn a_lookup_mostly_reads_the_one_slot_its_hash_names() {
        let index = &COMMAND_INDEX;
        let (mut longest, mut total) = (0, 0);
        for spec in super::super::table::COMMANDS {
            let mut slot = Index::<INDEX_SLOTS>::slot(spec.prefix);
            let mut probes = 1;
            while index.specs[usize::from(index.slots[slot])].prefix != spec.prefix {
                slot = (slot + 1) % INDEX_SLOTS;
                probes += 1;
            }
            longest = longest.max(probes);
            total += probes;
        }
        let mean = f64::from(total) / super::super::table::COMMANDS.len() as f64;
        assert!(
            longest <= 3 && mean < 1.2,
            "a lookup reads {mean:.2} slots on average, up to {longest}"
        );
    }

    #[test]
    fn table_is_sorted_and_the_index_finds_every_entry() {
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
        // Every length, the short ones assembled byte by byte.
        for len in 0..=9 {
            words.push(b"sEt@`{zZq"[..len].to_vec());
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
        assert!(lookup(b"FT.SEARCH", None).is_none());
        assert_eq!(lookup(b"json.get", None).map(|s| s.name), Some("JSON.GET"));
        assert!(lookup(b"", None).is_none());
        assert!(lookup(b"GETX", None).is_none());
    }
}
