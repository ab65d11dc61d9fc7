"""A simulated two-node cluster: reference actors on one node, policy workers on the other.

``ray.cluster_utils.Cluster`` starts real raylets on this machine; custom resources stand in
for "the reference nodes" and "the policy nodes" of a real cluster.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"reference_node": 1}})
    cluster.add_node(num_cpus=3, resources={"policy_node": 2})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_reference_and_policy_on_separate_nodes(two_nodes, tiny_config):
    import ray
    from ray.util.state import list_actors

    from ray_dpo.driver import run_dpo

    cfg = tiny_config("two-nodes", **{
        "reference.resources": "{reference_node: 0.5}",
        "policy.resources": "{policy_node: 1}",
        "policy.max_steps": 4,
    })
    summary = run_dpo(cfg)
    assert summary.steps == 4

    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    ref_nodes = {a.node_id for a in list_actors(filters=[("class_name", "=", "ReferenceActor")], detail=True)}
    policy_nodes = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)}
    assert ref_nodes and policy_nodes
    assert all("reference_node" in nodes[n] for n in ref_nodes)
    assert all("policy_node" in nodes[n] for n in policy_nodes)
    assert not ref_nodes & policy_nodes
    # The feeder stays on the driver's node (the head node under `ray job submit`): a lost
    # worker node takes no role but its own.
    from ray_dpo import compat

    driver_node = ray.get_runtime_context().get_node_id()
    feeders = [a for a in compat.actor_table().values() if a["ActorClassName"].endswith("_FeederActor")]
    assert feeders and all(a["Address"]["NodeID"] == driver_node for a in feeders), feeders
