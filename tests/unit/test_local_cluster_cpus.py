"""The logical CPUs of a local Ray cluster: what the config's actors hold at once, and the
console line that says how many the cluster got and why."""

from ray_dpo.config import RunConfig, local_cluster_cpus, local_cpus_needed


def test_the_local_cluster_line_says_how_many_cpus_and_why():
    cfg = RunConfig()
    cfg.policy.num_workers = 2
    cfg.online.enabled, cfg.online.judge.reward_model, cfg.online.judge.num_actors = True, "rm", 2
    cfg.online.judge.num_cpus_per_actor = 1.5
    assert local_cpus_needed(cfg) == 2 + 1 + 1 + 3 + 1
    cpus, why = local_cluster_cpus(cfg, cores=2)
    assert cpus == 8
    assert why == ("the most of 4, this machine's 2 cores and 8 the run's actors hold at once: 2 policy workers "
                   "x 1 + 1 reference actor x 1 + 1 generation engine x 1 + 2 reward-model judge actors x 1.5 "
                   "+ 1 for Ray Data tasks")
    assert local_cluster_cpus(cfg, cores=16)[0] == 16
    cfg.run.local_num_cpus = 4
    cpus, why = local_cluster_cpus(cfg, cores=2)
    assert cpus == 4 and why.startswith("run.local_num_cpus (fewer: some actors wait for a CPU that never frees); 8 ")
