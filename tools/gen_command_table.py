#!/usr/bin/env python3
"""Regenerates src/request/table.rs from a real Redis server's COMMAND INFO.

Usage:
    python3 tools/gen_command_table.py            # starts a throwaway redis-server
    REDIS_PORT=6379 python3 tools/gen_command_table.py   # or reads an existing one

Commands newer than that server (Debian's is 7.0) come from tools/newer_commands.json: the
flags of a newer Redis's top-level commands, as the npm package @ioredis/commands publishes
them. The server's own entries win where both have a command (and its subcommands come
only from the server). To refresh that file: `npm pack @ioredis/commands`, unpack it, and
run this script with `--newer package/built/commands.json 8.12` (the Redis version the
package lists), which rewrites the file from it before generating.

Commands of the modules Redis 8 has built in come from tools/module_commands.json, the
flags each module registers its commands with (only JSON's for now: a cache's reads of
JSON documents then fall back and retry as GET does).

Redis itself says which commands are read-only, write, pub/sub or blocking (the
`readonly`, `write`, `pubsub` and `blocking` flags of COMMAND INFO). It has no notion of
idempotency, nor of which commands change the connection they run on, so those come from
the curated lists below. Idempotency: a command is idempotent when sending it twice leaves
the data as sending it once would, and its reply does not tell the caller whether it was
the one that made a change (so `SET k v NX`, whose reply says "did I win", is not). Writes
whose reply counts what they changed (`DEL`, `SADD`: 1, then 0 on a resend) are idempotent
and flagged REPLY_COUNTS, so a retry policy can leave them alone. Every name in the lists
must exist on the server, so a refresh against a newer Redis fails loudly instead of
silently dropping an entry.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "src", "request", "table.rs")
NEWER = os.path.join(HERE, "newer_commands.json")
MODULES = os.path.join(HERE, "module_commands.json")

# Writes that are safe to send twice, with a reply a resend gives again. Conditional forms
# whose reply is the point are refined per call in src/request/info.rs (`SET ... NX|XX|GET`,
# `ZADD ... INCR`).
IDEMPOTENT_WRITES = {
    "set", "setex", "psetex", "mset", "setrange", "getex", "hmset", "hgetex",
    "lset", "ltrim",
    "vsetattr",
    "json.mset", "json.merge",
    "flushdb", "flushall",
    "xgroup|setid",
}

# Writes that are safe to send twice whose reply counts what they changed: a resend after
# the first ran answers 0 (or less) where the first answered 1 (`DEL`, `SADD`, `HSET`, and
# `EXPIRE`'s "was it set"). Idempotent, and flagged REPLY_COUNTS.
COUNTING_WRITES = {
    "del", "unlink", "expire", "pexpire", "expireat", "pexpireat", "persist",
    "hset", "hdel", "hexpire", "hpexpire", "hexpireat", "hpexpireat", "hpersist",
    "sadd", "srem",
    "zadd", "zrem", "zremrangebyscore", "zremrangebylex", "geoadd",
    "pfadd",
    "xdel", "xtrim", "xack", "xdelex", "xackdel", "xgroup|delconsumer", "xgroup|destroy",
    "vadd", "vrem",
    "json.del", "json.forget", "json.clear",
}

# Commands with neither `readonly` nor `write` that only read server state or set
# connection/server state to a fixed value: resending them is harmless.
IDEMPOTENT_OTHER = {
    "ping", "echo", "time", "info", "lastsave", "role", "select", "readonly", "readwrite",
    "auth", "hello", "asking",
    "command", "command|info", "command|docs", "command|count", "command|list",
    "command|getkeys", "command|getkeysandflags",
    "config|get", "config|set", "config|resetstat",
    "client|getname", "client|setname", "client|id", "client|info", "client|list",
    "client|getredir", "client|trackinginfo", "client|no-evict", "client|reply",
    "script|load", "script|exists", "script|flush",
    "function|list", "function|dump", "function|stats",
    "memory|stats", "memory|malloc-stats", "memory|doctor", "memory|purge",
    "slowlog|get", "slowlog|len", "slowlog|reset",
    "latency|latest", "latency|history", "latency|graph", "latency|doctor",
    "latency|histogram", "latency|reset",
    "acl|cat", "acl|whoami", "acl|users", "acl|getuser", "acl|list", "acl|log", "acl|dryrun",
    "cluster|info", "cluster|nodes", "cluster|slots", "cluster|shards", "cluster|myid",
    "cluster|keyslot", "cluster|countkeysinslot", "cluster|getkeysinslot", "cluster|links",
    "cluster|replicas", "cluster|slaves", "cluster|count-failure-reports",
    "pubsub|channels", "pubsub|numsub", "pubsub|numpat", "pubsub|shardchannels",
    "pubsub|shardnumsub",
}

# Commands that change the connection they run on for the commands after it: its mode
# (subscriber, monitor, replication stream, transaction), its database, its user or
# protocol, whether Redis answers on it, whether it stays open, whether Redis tracks the
# keys its reads return (client-side caching: the invalidations of every caller's reads
# go to one place, and the tracking ends unseen at the next reconnect; CLIENT CACHING
# applies to whichever caller's command comes next). On a connection many callers
# share, that would change it under all of them, so the leaf refuses these.
CONNECTION_STATE = {
    "subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe", "sunsubscribe",
    "monitor", "sync", "psync",
    "multi", "exec", "discard", "watch", "unwatch",
    "select", "auth", "hello", "reset", "quit", "client|reply",
    "client|tracking", "client|caching",
}

# Where the block timeout sits (`ArgSeconds(n)`: the n-th argument, the command's name
# being the 0th). Redis 7.0 does not flag WAIT `blocking`, though it blocks all the same;
# the check below keeps this map complete.
BLOCK_ARGS = {
    "blpop": "LastArgSeconds", "brpop": "LastArgSeconds", "brpoplpush": "LastArgSeconds",
    "blmove": "LastArgSeconds", "bzpopmin": "LastArgSeconds", "bzpopmax": "LastArgSeconds",
    "blmpop": "ArgSeconds(1)", "bzmpop": "ArgSeconds(1)",
    # BLMOVEM source destination LEFT|RIGHT LEFT|RIGHT timeout [...] (8.10)
    "blmovem": "ArgSeconds(5)",
    # BZMOVE source destination MIN|MAX timeout [COUNT count] (8.12)
    "bzmove": "ArgSeconds(4)",
    "xread": "BlockOptionMillis", "xreadgroup": "BlockOptionMillis",
    "wait": "LastArgMillis", "waitaof": "LastArgMillis",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), "--json", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def walk(commands, parent=None):
    for c in commands:
        name, _arity, flags, _first, _last, _step, _acl, _tips, _keyspecs, subs = c
        yield parent, name, set(flags)
        yield from walk(subs, name)


def flags_of(name, flags):
    out = []
    read_only = "readonly" in flags and "write" not in flags
    if read_only:
        out.append("READ_ONLY")
    if "write" in flags:
        out.append("WRITE")
    if (read_only or name in IDEMPOTENT_WRITES or name in COUNTING_WRITES
            or name in IDEMPOTENT_OTHER or name.endswith("|help")):
        out.append("IDEMPOTENT")
    if name in COUNTING_WRITES:
        out.append("REPLY_COUNTS")
    if "pubsub" in flags:
        out.append("PUBSUB")
    if name in ("set", "zadd"):
        out.append("REFINE_BY_ARGS")
    if name in CONNECTION_STATE:
        out.append("CONNECTION_STATE")
    return " | ".join(out) if out else "0"


def render(version, newer_version, rows):
    by_parent = {}
    for parent, name, flags in rows:
        by_parent.setdefault(parent, []).append((name, flags))

    lines = [
        f"// @generated by tools/gen_command_table.py from Redis {version}'s COMMAND INFO and,",
        f"// for commands newer than that, Redis {newer_version}'s (tools/newer_commands.json), and",
        "// the JSON module's own (tools/module_commands.json).",
        "// Do not edit by hand: change the generator and run it again.",
        "",
        "use super::spec::{BlockArg, CommandSpec, flags::*};",
        "",
    ]

    def spec(name, flags, subs_ident):
        key = name.split("|")[-1].upper()
        display = name.replace("|", " ").upper()
        block = BLOCK_ARGS.get(name, "None")
        return (f"    CommandSpec::new({json.dumps(key)}, {json.dumps(display)}, "
                f"{flags_of(name, flags)}, BlockArg::{block}, {subs_ident}),")

    top = sorted(by_parent[None], key=lambda r: r[0].upper())
    for name, _ in top:
        subs = by_parent.get(name)
        if subs:
            ident = "SUB_" + name.upper().replace("-", "_")
            lines.append(f"static {ident}: &[CommandSpec] = &[")
            for sub, flags in sorted(subs, key=lambda r: r[0].split("|")[-1].upper()):
                lines.append(spec(sub, flags, "&[]"))
            lines.append("];")
            lines.append("")

    lines.append(f"/// Every command of Redis {newer_version}, sorted by `key`.")
    lines.append("pub(super) static COMMANDS: &[CommandSpec] = &[")
    for name, flags in top:
        ident = "SUB_" + name.upper().replace("-", "_") if by_parent.get(name) else "&[]"
        lines.append(spec(name, flags, ident))
    lines.append("];")
    return "\n".join(lines) + "\n"


def load_newer():
    """The newer Redis's version and its commands' flags, by lower-case name."""
    with open(NEWER) as f:
        newer = json.load(f)
    return newer["redis_version"], newer["commands"]


def import_newer(path, redis_version):
    """Rewrites tools/newer_commands.json from an @ioredis/commands `commands.json`."""
    with open(path) as f:
        commands = json.load(f)
    with open(NEWER) as f:
        source = json.load(f)["source"]
    lines = ["{", f" \"source\": {json.dumps(source)},",
             f" \"redis_version\": {json.dumps(redis_version)},", " \"commands\": {"]
    names = sorted(commands)
    for i, name in enumerate(names):
        comma = "," if i < len(names) - 1 else ""
        lines.append(f"  {json.dumps(name)}: {json.dumps(commands[name]['flags'])}{comma}")
    lines += [" }", "}"]
    with open(NEWER, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--newer":
        # --newer PATH VERSION: PATH is the package's built/commands.json, VERSION the
        # Redis version it lists (its release notes say).
        import_newer(sys.argv[2], sys.argv[3])
    elif len(sys.argv) != 1:
        sys.exit("usage: gen_command_table.py [--newer path/to/commands.json REDIS_VERSION]")
    port = os.environ.get("REDIS_PORT")
    server = None
    if port is None:
        port = free_port()
        tmp = tempfile.mkdtemp()
        server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                                   "--dir", tmp], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
    try:
        info = redis_cli(port, "COMMAND", "INFO")
        version = next(line.split(":", 1)[1] for line in
                       subprocess.run(["redis-cli", "-p", str(port), "INFO", "server"],
                                      check=True, capture_output=True, text=True).stdout.splitlines()
                       if line.startswith("redis_version:")).strip()
    finally:
        if server:
            server.kill()

    rows = list(walk(info))
    from_server = len(rows)
    newer_version, newer = load_newer()
    known = {name for _, name, _ in rows}
    relevant = {"readonly", "write", "pubsub", "blocking"}
    for parent, name, flags in rows:
        if parent is None and name in newer and set(newer[name]) & relevant != flags & relevant:
            print(f"note: Redis {newer_version} flags {name} {sorted(set(newer[name]) & relevant)}"
                  f", Redis {version} {sorted(flags & relevant)}; the table keeps Redis {version}'s")
    added = sorted(set(newer) - known)
    rows += [(None, name, set(newer[name])) for name in added]
    with open(MODULES) as f:
        modules = json.load(f)["commands"]
    from_modules = sorted(set(modules) - known - set(added))
    rows += [(None, name, set(modules[name])) for name in from_modules]
    names = {name for _, name, _ in rows}
    missing = sorted((IDEMPOTENT_WRITES | COUNTING_WRITES | IDEMPOTENT_OTHER | CONNECTION_STATE
                      | set(BLOCK_ARGS)) - names)
    if missing:
        sys.exit(f"curated names not on this server: {missing}")
    flagged_blocking = {name for _, name, flags in rows if "blocking" in flags}
    unmapped = sorted(flagged_blocking - set(BLOCK_ARGS))
    if unmapped:
        sys.exit(f"blocking commands without a BLOCK_ARGS entry: {unmapped}")
    writes_marked_other = sorted(n for _, n, f in rows if n in IDEMPOTENT_OTHER and "write" in f)
    if writes_marked_other:
        sys.exit(f"IDEMPOTENT_OTHER holds write commands, move them: {writes_marked_other}")

    with open(OUT, "w") as f:
        f.write(render(version, newer_version, rows))
    print(f"wrote {OUT}: {from_server} commands and subcommands from Redis {version}, "
          f"{len(added)} more from Redis {newer_version}, and {len(from_modules)} of modules")


if __name__ == "__main__":
    main()
