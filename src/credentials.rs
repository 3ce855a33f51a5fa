//! Credentials asked for anew at every connect, for servers whose passwords are tokens
//! that expire.

use std::{borrow::Cow, fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use redis::ConnectionInfo;

use crate::{Error, service::RedisService};

/// What a connection authenticates with (`AUTH` or `HELLO`): an ACL user name and a
/// password, or a token that stands in for one. Given by the provider of
/// [`Connector::credentials`](crate::Connector::credentials).
///
/// Its `Debug` never shows the password.
///
/// ```
/// use tower_redis_resilience::Credentials;
///
/// let credentials = Credentials::new("app", "token-from-the-identity-service");
/// assert_eq!(credentials.username(), Some("app"));
/// assert!(!format!("{credentials:?}").contains("token"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: Option<String>,
    password: String,
    valid_for: Option<Duration>,
}

impl Credentials {
    /// The password of ACL user `username`.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: Some(username.into()),
            password: password.into(),
            valid_for: None,
        }
    }

    /// A password alone: for the user the connector's URL names, or for `default` if it
    /// names none.
    pub fn password_only(password: impl Into<String>) -> Self {
        Credentials {
            username: None,
            password: password.into(),
            valid_for: None,
        }
    }

    /// The user name, if one was given.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The password (or token).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// How long from now the token is valid. A connection opened with it then asks the
    /// provider again when three quarters of that time have passed, and sends `AUTH` with
    /// the new credentials on the open connection, for services that close connections
    /// whose token has expired unless they authenticate again (Azure's, with Entra ID).
    /// Without it, a connection keeps the credentials it opened with.
    #[must_use]
    pub fn valid_for(mut self, validity: Duration) -> Self {
        self.valid_for = Some(validity);
        self
    }

    /// How long the token is valid, if the provider said.
    pub fn validity(&self) -> Option<Duration> {
        self.valid_for
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("valid_for", &self.valid_for)
            .finish()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Fetch = Pin<Box<dyn Future<Output = Result<Credentials, BoxError>> + Send>>;

/// The provider a connector asks before each connection, cheap to clone.
#[derive(Clone)]
pub(crate) struct Provider(Arc<dyn Fn() -> Fetch + Send + Sync>);

impl Provider {
    pub(crate) fn new<F, Fut, E>(provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Credentials, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Provider(Arc::new(move || {
            let fetch = provider();
            Box::pin(async move { fetch.await.map_err(Into::into) })
        }))
    }

    /// Asks the provider. Its failure is [unavailable](Error::is_unavailable): a token
    /// service that did not answer this time may the next, and the connect is tried again
    /// at the reconnect schedule's pace.
    pub(crate) async fn fetch(&self) -> Result<Credentials, Error> {
        (self.0)().await.map_err(|error| {
            Error::unavailable_because(format!("the credentials provider failed: {error}"))
        })
    }

    /// `info` with credentials asked for now: the provider's user name, if it gives one,
    /// replaces `info`'s.
    async fn apply<'a>(&self, info: &'a ConnectionInfo) -> Result<Authenticated<'a>, Error> {
        let credentials = self.fetch().await?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = credentials.username() {
            settings = settings.set_username(username);
        }
        settings = settings.set_password(credentials.password());
        let renewal = credentials.valid_for.map(|valid_for| Renewal {
            provider: self.clone(),
            username: info.redis_settings().username().map(str::to_owned),
            valid_for,
        });
        Ok(Authenticated {
            info: Cow::Owned(info.clone().set_redis_settings(settings)),
            renewal,
        })
    }
}

/// How to connect, with the credentials asked for just now; and how to renew them, if
/// they expire.
pub(crate) struct Authenticated<'a> {
    pub(crate) info: Cow<'a, ConnectionInfo>,
    renewal: Option<Renewal>,
}

impl Authenticated<'_> {
    /// Keeps the connection of `service`, opened with these credentials, authenticated:
    /// see [`Credentials::valid_for`]. Nothing to do for credentials that do not expire.
    pub(crate) fn keep(self, service: &RedisService, reply_timeout: Duration) {
        if let Some(renewal) = self.renewal {
            renewal.keep(service, reply_timeout);
        }
    }
}

/// `info` as it is without a provider, or with credentials asked for now.
pub(crate) async fn fresh<'a>(
    provider: Option<&Provider>,
    info: &'a ConnectionInfo,
) -> Result<Authenticated<'a>, Error> {
    match provider {
        None => Ok(Authenticated {
            info: Cow::Borrowed(info),
            renewal: None,
        }),
        Some(provider) => provider.apply(info).await,
    }
}

/// When credentials valid for `validity` are renewed: at three quarters of it, and not
/// more often than once a second.
fn renew_after(validity: Duration) -> Duration {
    (validity / 4 * 3).max(Duration::from_secs(1))
}

/// When a renewal that failed with `left` of the old credentials' validity is tried again:
/// at half of it, and not more often than every 100 ms.
fn retry_after(left: Duration) -> Duration {
    (left / 2).max(Duration::from_millis(100))
}

/// Credentials that expire, and how to get their successors.
struct Renewal {
    provider: Provider,
    /// The URL's user, for answers that give a password alone.
    username: Option<String>,
    valid_for: Duration,
}

impl Renewal {
    /// Sends `AUTH` with new credentials on `service`'s connection before each set
    /// expires, for as long as the service is held. A renewal that fails (the provider,
    /// or Redis refusing the new token) is tried again at half the time left, until the
    /// old token has expired: a service that then closes the connection has
    /// [`Reconnect`](crate::reconnect::Reconnect) open another, with credentials asked
    /// for anew. `AUTH` waits behind what was sent before it (a `BLPOP` on a blocking
    /// command's connection): it is given up on after `reply_timeout`, so that it never
    /// keeps open a connection its service let go.
    fn keep(self, service: &RedisService, reply_timeout: Duration) {
        let service = service.downgrade();
        tokio::spawn(async move {
            let mut expires = tokio::time::Instant::now() + self.valid_for;
            let mut wait = renew_after(self.valid_for);
            loop {
                tokio::time::sleep(wait).await;
                let Some(connection) = service.connection() else {
                    return;
                };
                let now = tokio::time::Instant::now();
                match self.renew(connection, reply_timeout).await {
                    Ok(Some(validity)) => {
                        expires = now + validity;
                        wait = renew_after(validity);
                    }
                    // New credentials that do not expire: nothing more to renew.
                    Ok(None) => return,
                    Err(error) => {
                        let left = expires.saturating_duration_since(now);
                        if left.is_zero() || service.connection().is_none() {
                            return;
                        }
                        tracing::warn!(%error, "redis: renewing a connection's credentials failed; trying again");
                        wait = retry_after(left);
                    }
                }
            }
        });
    }

    /// Asks for new credentials and authenticates `connection` with them; answers how
    /// long they are valid.
    async fn renew(
        &self,
        mut connection: redis::aio::MultiplexedConnection,
        reply_timeout: Duration,
    ) -> Result<Option<Duration>, Error> {
        let credentials = self.provider.fetch().await?;
        let mut auth = redis::cmd("AUTH");
        if let Some(username) = credentials.username().or(self.username.as_deref()) {
            auth.arg(username);
        }
        auth.arg(credentials.password());
        match tokio::time::timeout(reply_timeout, connection.send_packed_command(&auth)).await {
            Ok(reply) => reply.map_err(Error::from_connect)?,
            Err(_) => return Err(Error::unavailable("no reply to AUTH in time")),
        };
        Ok(credentials.valid_for)
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Provider")
    }
}

/// The provider as redis-rs's cluster client asks it: each time it connects to a node
/// (its own reconnects included), it subscribes and takes the first answer to
/// authenticate; a second subscription, for as long as the connection lives, sends `AUTH`
/// with each further answer. A subscription answers the provider at once, then, for
/// credentials that expire, again at three quarters of their validity (and after a failed
/// renewal, at half the time left).
#[cfg(feature = "cluster")]
pub(crate) struct ForCluster {
    provider: Provider,
    /// For answers without a user name: redis-rs sends the one it is given, and a
    /// password alone is for the nodes' URL user, or `default`.
    username: String,
}

#[cfg(feature = "cluster")]
impl ForCluster {
    pub(crate) fn new(provider: Provider, nodes_username: Option<&str>) -> Self {
        ForCluster {
            provider,
            username: nodes_username.unwrap_or("default").to_owned(),
        }
    }
}

#[cfg(feature = "cluster")]
impl redis::StreamingCredentialsProvider for ForCluster {
    fn subscribe(
        &self,
    ) -> Pin<Box<dyn futures_core::Stream<Item = redis::RedisResult<redis::BasicAuth>> + Send>>
    {
        Box::pin(Answers {
            provider: self.provider.clone(),
            username: self.username.clone(),
            state: State::Fetching((self.provider.0)()),
            expires: None,
        })
    }
}

/// The provider's answers, each when the one before is due for renewal.
#[cfg(feature = "cluster")]
struct Answers {
    provider: Provider,
    username: String,
    state: State,
    /// When the last credentials given expire, if they do.
    expires: Option<tokio::time::Instant>,
}

#[cfg(feature = "cluster")]
enum State {
    Fetching(Fetch),
    Waiting(Pin<Box<tokio::time::Sleep>>),
    /// Credentials that do not expire were given, or the last expired: no more answers.
    Done,
}

#[cfg(feature = "cluster")]
impl futures_core::Stream for Answers {
    type Item = redis::RedisResult<redis::BasicAuth>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::{Poll, ready};
        let this = &mut *self;
        loop {
            let fetch = match &mut this.state {
                State::Done => return Poll::Pending,
                State::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state = State::Fetching((this.provider.0)());
                    continue;
                }
                State::Fetching(fetch) => fetch,
            };
            let answer = ready!(fetch.as_mut().poll(cx));
            let now = tokio::time::Instant::now();
            let (next, item) = match answer {
                Ok(credentials) => {
                    this.expires = credentials.valid_for.map(|validity| now + validity);
                    let next = credentials.valid_for.map(renew_after);
                    let username = credentials
                        .username
                        .unwrap_or_else(|| this.username.clone());
                    (
                        next,
                        Ok(redis::BasicAuth::new(username, credentials.password)),
                    )
                }
                Err(error) => {
                    let left = this
                        .expires
                        .map(|expires| expires.saturating_duration_since(now));
                    let next = left.filter(|left| !left.is_zero()).map(retry_after);
                    let error =
                        std::io::Error::other(format!("the credentials provider failed: {error}"));
                    (next, Err(redis::RedisError::from(error)))
                }
            };
            this.state = match next {
                Some(wait) => State::Waiting(Box::pin(tokio::time::sleep(wait))),
                None => State::Done,
            };
            return Poll::Ready(Some(item));
        }
    }
}
