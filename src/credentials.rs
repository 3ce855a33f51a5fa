//! Credentials asked for anew at every connect, for servers whose passwords are tokens
//! that expire.

use std::{borrow::Cow, fmt, future::Future, pin::Pin, sync::Arc};

use redis::ConnectionInfo;

use crate::Error;

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
}

impl Credentials {
    /// The password of ACL user `username`.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: Some(username.into()),
            password: password.into(),
        }
    }

    /// A password alone: for the user the connector's URL names, or for `default` if it
    /// names none.
    pub fn password_only(password: impl Into<String>) -> Self {
        Credentials {
            username: None,
            password: password.into(),
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
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
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
    pub(crate) async fn apply(&self, info: &ConnectionInfo) -> Result<ConnectionInfo, Error> {
        let credentials = self.fetch().await?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = credentials.username() {
            settings = settings.set_username(username);
        }
        settings = settings.set_password(credentials.password());
        Ok(info.clone().set_redis_settings(settings))
    }
}

/// `info` as it is without a provider, or with credentials asked for now.
pub(crate) async fn fresh<'a>(
    provider: Option<&Provider>,
    info: &'a ConnectionInfo,
) -> Result<Cow<'a, ConnectionInfo>, Error> {
    match provider {
        None => Ok(Cow::Borrowed(info)),
        Some(provider) => provider.apply(info).await.map(Cow::Owned),
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Provider")
    }
}

/// The provider as redis-rs's cluster client asks it: each time it connects to a node
/// (its own reconnects included), it subscribes and takes the first answer. A
/// subscription answers the provider once, then nothing more: redis-rs would
/// re-authenticate its connection in place with each further answer.
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
        Box::pin(Once::Fetching {
            fetch: (self.provider.0)(),
            username: self.username.clone(),
        })
    }
}

/// The provider's one answer, then a stream that neither yields nor ends.
#[cfg(feature = "cluster")]
enum Once {
    Fetching { fetch: Fetch, username: String },
    Answered,
}

#[cfg(feature = "cluster")]
impl futures_core::Stream for Once {
    type Item = redis::RedisResult<redis::BasicAuth>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let Once::Fetching { fetch, username } = &mut *self else {
            return std::task::Poll::Pending;
        };
        let answer = std::task::ready!(fetch.as_mut().poll(cx));
        let username = std::mem::take(username);
        *self = Once::Answered;
        std::task::Poll::Ready(Some(match answer {
            Ok(credentials) => Ok(redis::BasicAuth::new(
                credentials.username.unwrap_or(username),
                credentials.password,
            )),
            Err(error) => Err(redis::RedisError::from(std::io::Error::other(format!(
                "the credentials provider failed: {error}"
            )))),
        }))
    }
}
