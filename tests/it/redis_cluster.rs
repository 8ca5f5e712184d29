//! The shared tier on a three-node Redis Cluster (`cluster = [...]`): the
//! same scenarios as `redis_tier.rs`. Every test forms its own cluster.

use crate::harness::redis::*;

#[tokio::test(flavor = "multi_thread")]
async fn cluster_a_fill_is_a_hit_on_the_other_instance() {
    let cluster = RedisCluster::start(3);
    scenario_shared_fill(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_unsafe_request_on_one_instance_invalidates_the_other() {
    let cluster = RedisCluster::start(3);
    scenario_invalidation(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_a_new_fill_replaces_the_other_instances_copy() {
    let cluster = RedisCluster::start(3);
    scenario_refill_replaces_peer_copy(&cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_concurrent_misses_across_instances_reach_the_origin_once() {
    let cluster = RedisCluster::start(3);
    scenario_fleet_collapsing(&cluster).await;
}
