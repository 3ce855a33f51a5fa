//! Tokens that expire, as a managed Redis hands them out (AWS IAM, Azure Entra ID): a
//! token service issues a new token for ACL user `app` every second, each valid for 1.5 s,
//! and revokes each one as it expires. The client asks it for the token of the moment
//! before every connection, and renews the credentials of its open connection before they
//! expire. Halfway through, every connection of `app` is closed, as a service closes
//! connections whose token has expired: the client reconnects with the current token,
//! where one given once in the URL is refused by then.
//!
//! `cargo run --example expiring_tokens` starts a throwaway `redis-server` on a free
//! loopback port (it must be installed). With `REDIS_URL` set it uses that server, whose
//! user must be allowed `ACL SETUSER` and `CLIENT KILL`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use tower_redis_resilience::{Connector, Credentials, ResilientClient};

/// How long each token is valid; a new one comes every second.
const VALIDITY: Duration = Duration::from_millis(1500);

/// The token service's stand-in: it issues tokens by changing `app`'s passwords on the
/// server, and hands out the latest.
#[derive(Clone)]
struct TokenService {
    admin: redis::Client,
    latest: Arc<Mutex<(u32, String)>>,
}

impl TokenService {
    /// Issues token `n` and revokes token `n - 2`, which has expired.
    async fn issue(&self, n: u32) -> redis::RedisResult<()> {
        let mut admin = self.admin.get_multiplexed_async_connection().await?;
        let token = format!("token-{n}");
        let mut setuser = redis::cmd("ACL");
        setuser
            .arg("SETUSER")
            .arg("app")
            .arg("on")
            .arg(format!(">{token}"))
            .arg("~*")
            .arg("+@all");
        if n >= 2 {
            setuser.arg(format!("<token-{}", n - 2));
        }
        let () = setuser.query_async(&mut admin).await?;
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = (n, token);
        Ok(())
    }

    fn latest(&self) -> (u32, String) {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, server) = support::redis_url_or_throwaway_server();
    let tokens = TokenService {
        admin: redis::Client::open(url.as_str())?,
        latest: Arc::default(),
    };
    tokens.issue(0).await?;
    let issuing = {
        let tokens = tokens.clone();
        tokio::spawn(async move {
            for n in 1.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(error) = tokens.issue(n).await {
                    eprintln!("the token service could not issue token {n}: {error}");
                }
            }
        })
    };

    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
    let address = info.addr().to_string();
    let asked = Arc::new(Mutex::new(0u32));
    let connector =
        Connector::from_url(&format!("redis://app@{address}"))?.credentials({
            let (tokens, asked) = (tokens.clone(), Arc::clone(&asked));
            move || {
                *asked.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                let (_, token) = tokens.latest();
                async move {
                    Ok::<_, std::io::Error>(Credentials::password_only(token).valid_for(VALIDITY))
                }
            }
        });
    let mut client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await?;

    let started = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut closed_connections = false;
    for second in 1..=6 {
        while started.elapsed() < Duration::from_secs(second) {
            match client.incr::<_, _, i64>("example:tokens", 1).await {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut client)
            .await?;
        let (n, _) = tokens.latest();
        println!(
            "{second} s  token-{n} is the latest; connection {id}; provider asked {} times; \
             {ok} INCRs ok, {failed} failed",
            asked.lock().unwrap_or_else(|e| e.into_inner())
        );
        if second == 3 && !closed_connections {
            closed_connections = true;
            let mut admin = tokens.admin.get_multiplexed_async_connection().await?;
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("USER")
                .arg("app")
                .query_async(&mut admin)
                .await?;
            println!("      every connection of `app` closed, as for an expired token");
            let fixed = Connector::from_url(&format!("redis://app:token-0@{address}"))?;
            match fixed.connect().await {
                Ok(_) => println!("      token-0, given once in a URL, still works"),
                Err(error) => println!("      token-0, given once in a URL, is refused: {error}"),
            }
        }
    }
    issuing.abort();
    drop(server);
    println!("{ok} INCRs ok, {failed} failed");
    Ok(())
}
