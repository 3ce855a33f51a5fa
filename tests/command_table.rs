//! The committed command table agrees with the flags of the redis-server at hand.

mod support;

use redis::Value;
use support::RedisServer;
use tower_redis_resilience::{Client, CommandInfo, RedisService, UNKNOWN_COMMAND};

struct Live {
    name: String,
    flags: Vec<String>,
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => panic!("not text: {other:?}"),
    }
}

/// Flattens COMMAND INFO's nested reply: every command and subcommand with its flags.
fn walk(entries: &[Value], out: &mut Vec<Live>) {
    for entry in entries {
        let Value::Array(fields) = entry else {
            continue;
        };
        let flags = match &fields[2] {
            Value::Array(flags) | Value::Set(flags) => flags.iter().map(text).collect(),
            other => panic!("flags: {other:?}"),
        };
        out.push(Live {
            name: text(&fields[0]),
            flags,
        });
        if let Some(Value::Array(subs)) = fields.get(9) {
            walk(subs, out);
        }
    }
}

fn request_for(name: &str) -> redis::Cmd {
    let mut words = name.split('|');
    let mut cmd = redis::cmd(words.next().unwrap());
    for word in words {
        cmd.arg(word);
    }
    cmd
}

#[tokio::test]
async fn table_flags_match_the_live_servers_command_info() {
    let server = RedisServer::start();
    let mut client = Client::new(RedisService::connect(&server.url()).await.unwrap());
    let Value::Array(entries) = redis::cmd("COMMAND")
        .arg("INFO")
        .query_async(&mut client)
        .await
        .unwrap()
    else {
        panic!("COMMAND INFO is an array")
    };
    let mut live = Vec::new();
    walk(&entries, &mut live);
    assert!(
        live.len() > 200,
        "COMMAND INFO listed {} commands",
        live.len()
    );

    let mut unknown = Vec::new();
    let mut checked = 0;
    for command in &live {
        let info = CommandInfo::of_cmd(&request_for(&command.name));
        if info.name() == UNKNOWN_COMMAND {
            unknown.push(command.name.clone());
            continue;
        }
        let has = |flag: &str| command.flags.iter().any(|f| f == flag);
        assert_eq!(info.name(), command.name.replace('|', " ").to_uppercase());
        assert_eq!(
            info.is_read_only(),
            has("readonly") && !has("write"),
            "{}",
            command.name
        );
        assert_eq!(info.is_pubsub(), has("pubsub"), "{}", command.name);
        checked += 1;
    }
    assert!(checked > 200, "only {checked} commands checked");
    if !unknown.is_empty() {
        eprintln!(
            "this redis-server has commands the table lacks (run tools/gen_command_table.py \
             against it to add them): {unknown:?}"
        );
    }
}
