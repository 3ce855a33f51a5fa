//! A gRPC service (tonic) whose handler reads through Redis as a cache, with the same
//! degradation as the axum example: while Redis is down the handler answers from the
//! database instead of failing or hanging.
//!
//! No `protoc` and no build script: the messages are `prost` derives and the service is
//! the few lines `tonic-build` would generate for this schema:
//!
//! ```proto
//! syntax = "proto3";
//! package catalog;
//! service Catalog { rpc GetItem (GetItemRequest) returns (Item); }
//! message GetItemRequest { uint32 id = 1; }
//! message Item { uint32 id = 1; string name = 2; bool from_cache = 3; }
//! ```
//!
//! `cargo run --example tonic_service` uses `REDIS_URL` if set, and otherwise starts a
//! throwaway `redis-server` on a free loopback port (it must be installed); it serves on
//! a loopback port and calls itself twice (a miss, then a hit).

// `pub` so that the test that runs this example uses the same harness.
#[path = "../tests/support/mod.rs"]
pub mod support;

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use redis::AsyncCommands;
use tonic::{
    Status,
    body::Body,
    codegen::http,
    server::NamedService,
    transport::{Channel, Server, server::TcpIncoming},
};
use tonic_prost::ProstCodec;
use tower::Service;
use tower_redis_resilience::ResilientClient;

/// `catalog.GetItemRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetItemRequest {
    #[prost(uint32, tag = "1")]
    pub id: u32,
}

/// `catalog.Item`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Item {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(bool, tag = "3")]
    pub from_cache: bool,
}

const GET_ITEM: &str = "/catalog.Catalog/GetItem";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The `catalog.Catalog` service: a Redis cache in front of a slow database.
#[derive(Clone)]
pub struct Catalog {
    redis: ResilientClient,
}

impl Catalog {
    pub fn new(redis: ResilientClient) -> Self {
        Catalog { redis }
    }

    /// The handler: cache-aside, never failing because of Redis.
    async fn get_item(mut self, id: u32) -> Result<Item, Status> {
        let key = format!("item:{id}");
        // `None` on a miss, and also while Redis cannot answer (the fallback layer).
        match self.redis.get::<_, Option<String>>(&key).await {
            Ok(Some(name)) => {
                return Ok(Item {
                    id,
                    name,
                    from_cache: true,
                });
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(%err, "cache read failed"),
        }
        let name = load_from_database(id)
            .await
            .ok_or_else(|| Status::not_found(format!("no item {id}")))?;
        // Fails fast while Redis is down; the reply goes out all the same.
        let _ = self.redis.set_ex::<_, _, ()>(&key, &name, 60).await;
        Ok(Item {
            id,
            name,
            from_cache: false,
        })
    }
}

/// The stand-in for a real database: 20 ms per read, items 1 to 100.
async fn load_from_database(id: u32) -> Option<String> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    (1..=100).contains(&id).then(|| format!("item number {id}"))
}

impl NamedService for Catalog {
    const NAME: &'static str = "catalog.Catalog";
}

/// What `tonic-build` generates: route by path, decode, call the handler, encode.
impl Service<http::Request<Body>> for Catalog {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != GET_ITEM {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let handler = GetItem(self.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Item, GetItemRequest>::default());
            Ok(grpc.unary(handler, request).await)
        })
    }
}

/// The unary method as a service of decoded messages.
struct GetItem(Catalog);

impl Service<tonic::Request<GetItemRequest>> for GetItem {
    type Response = tonic::Response<Item>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::Request<GetItemRequest>) -> Self::Future {
        let catalog = self.0.clone();
        Box::pin(async move {
            let id = request.into_inner().id;
            catalog.get_item(id).await.map(tonic::Response::new)
        })
    }
}

/// Serves `catalog` on a free loopback port until the task is dropped.
pub async fn serve(catalog: Catalog) -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?;
    let address = incoming.local_addr()?;
    tokio::spawn(
        Server::builder()
            .add_service(catalog)
            .serve_with_incoming(incoming),
    );
    Ok(address)
}

/// The client side, as `tonic-build` would generate it.
pub async fn get_item(channel: Channel, id: u32) -> Result<Item, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|err| Status::unavailable(err.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(GET_ITEM);
    let request = tonic::Request::new(GetItemRequest { id });
    let codec = ProstCodec::<GetItemRequest, Item>::default();
    Ok(grpc.unary(request, path, codec).await?.into_inner())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _server) = support::redis_url_or_throwaway_server();
    let redis = ResilientClient::builder(&url).build()?;
    let address = serve(Catalog::new(redis)).await?;
    println!("catalog.Catalog on {address}");

    let channel = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    for _ in 0..2 {
        let item = get_item(channel.clone(), 7).await?;
        println!("GetItem(7) -> {item:?}");
    }
    let missing = get_item(channel, 1000).await.unwrap_err();
    println!(
        "GetItem(1000) -> {:?}: {}",
        missing.code(),
        missing.message()
    );
    Ok(())
}
