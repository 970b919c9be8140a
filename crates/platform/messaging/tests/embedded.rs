//! The conformance suite against the embedded broker, served over real HTTP on a
//! free port from a fresh data directory.
#![allow(clippy::unwrap_used)]

mod conformance;

use std::sync::Arc;

use messaging::embedded::client::EmbeddedBus;
use messaging::embedded::store::LogConfig;
use messaging::embedded::{Broker, server};

async fn bus() -> conformance::Bus {
    let dir = std::env::temp_dir().join(format!("bazaar-log-{}", uuid::Uuid::new_v4().simple()));
    let mut config = LogConfig::new(dir);
    config.partitions = 4;
    let broker = Broker::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, server::router(broker)).await });
    Arc::new(EmbeddedBus::new(&url))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            conformance::$name(bus().await).await;
        }
    )*};
}

conformance!(
    an_event_arrives_whole_with_its_key_offset_and_attempt,
    members_of_a_group_share_work_and_keep_each_keys_order,
    every_group_gets_every_event,
    what_a_dead_consumer_held_is_redelivered_to_another,
    a_nack_brings_the_message_back_after_the_delay_before_later_ones,
    a_group_replays_from_an_offset_or_a_time,
    malformed_bytes_arrive_marked_and_block_nothing,
);
