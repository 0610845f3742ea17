r"""Scoring a dataset with Ray Data (loss_service.ray) in Ray's local mode on this machine (2 CPUs).

The reference is one ScoreBatch on the concatenation of every row (a server from the session's
artifacts), per group too; the blocks are scored in process with the library and through that
server, from an in-memory dataset and from Parquet files.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
import ray.data  # noqa: E402

from loss_service import losses  # noqa: E402
from loss_service.client import LossClient  # noqa: E402
from loss_service.ray import block_statistics, score_dataset  # noqa: E402
from loss_service.server import BackgroundServer, ServerConfig  # noqa: E402

ROWS = 36
# One scorer actor: the machine has 2 cores, and the tests compare values, not speed.
ONE_SCORER = {"compute": ray.data.ActorPoolStrategy(size=1)}
CASES = [
    ("dice", {"mode": "multiclass", "batch": True}),
    ("focal", {"gamma": 1.5, "class_weight": [0.5, 2.0, 1.0]}),
    ("bce_with_logits", {"pos_weight": [2.0, 1.0, 0.5]}),
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 * 1024,
             configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(server_artifacts):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), workers=2,
                          export_missing=server_artifacts.export_missing)
    with BackgroundServer(config, address="127.0.0.1:0") as running:
        yield running


def dataset_of(name, params, seed=0):
    r"""Rows of one sample each: predictions, targets, a weight and a site label."""
    spec = losses.get(name)
    generator = torch.Generator().manual_seed(seed)
    predictions, targets = spec.make_inputs(ROWS, 3, (6,), generator, torch.float32, params)
    weights = torch.rand(ROWS, generator=generator) + 0.1
    sites = torch.randint(0, 4, (ROWS,), generator=generator) * 10
    rows = [{"logits": predictions[i].numpy(), "label": targets[i].numpy(), "weight": float(weights[i]),
             "site": int(sites[i])} for i in range(ROWS)]
    return ray.data.from_items(rows).repartition(4), (predictions, targets, weights, sites)


def client_params(params):
    sent = dict(params)
    if "class_weight" in sent:
        sent["class_weights"] = sent.pop("class_weight")
    return sent


@pytest.mark.parametrize("name,params", CASES)
def test_a_dataset_scored_in_process_equals_scorebatch_on_all_of_it(server, name, params):
    dataset, (predictions, targets, weights, sites) = dataset_of(name, params)
    result = score_dataset(dataset, name, predictions="logits", targets="label", weights="weight", group_by="site",
                           per_class=True, batch_size=5, map_options=ONE_SCORER, **params)
    with LossClient(server.target) as client:
        whole = client.score(name, predictions, targets, weights, group_ids=sites, return_per_class=True,
                             **client_params(params))
    assert result.statistics.num_batches >= ROWS // 5
    assert result.loss == pytest.approx(whole.loss, rel=1e-6)
    assert (result.num_elements, result.weight_sum) == pytest.approx((whole.num_elements, whole.weight_sum), rel=1e-6)
    np.testing.assert_array_equal(result.group_ids, whole.group_ids)
    np.testing.assert_allclose(result.group_losses, whole.group_losses, rtol=1e-6)
    np.testing.assert_allclose(result.class_losses, whole.class_losses, rtol=1e-6)
    assert (result.class_scores is None) == (whole.class_scores is None)
    if whole.class_scores is not None:
        np.testing.assert_allclose(result.class_scores, whole.class_scores, rtol=1e-6)


def test_a_parquet_dataset_scored_through_the_service(server, tmp_path):
    name, params = CASES[0]
    dataset, (predictions, targets, _, sites) = dataset_of(name, params, seed=1)
    dataset.write_parquet(str(tmp_path))
    from_files = ray.data.read_parquet(str(tmp_path))
    result = score_dataset(from_files, name, predictions="logits", targets="label", group_by="site", per_class=True,
                           service=server.target, client_options={"timeout": 60}, map_options=ONE_SCORER,
                           **client_params(params))
    with LossClient(server.target) as client:
        whole = client.score(name, predictions, targets, group_ids=sites, return_per_class=True,
                             **client_params(params))
    assert result.backend == "eager" and result.loss == pytest.approx(whole.loss, rel=1e-6)
    np.testing.assert_allclose(result.group_losses, whole.group_losses, rtol=1e-6)
    np.testing.assert_allclose(result.class_losses, whole.class_losses, rtol=1e-6)


def test_block_statistics_are_kept_and_merged_later():
    from loss_service import evaluation
    from loss_service.statistics import merge

    name, params = CASES[1]
    dataset, (predictions, targets, _, _) = dataset_of(name, params, seed=2)
    parts = block_statistics(dataset, name, predictions="logits", targets="label", batch_size=12,
                             map_options=ONE_SCORER, **params)
    assert len(parts) >= 3 and not parts[0].grouped
    expected = float(losses.build(name, **params)(predictions, targets))
    assert evaluation.evaluate(merge(parts)).loss == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="device must be one of"):
        score_dataset(dataset, name, predictions="logits", targets="label", device="tpu")


def test_nothing_but_loss_service_ray_imports_ray():
    code = (
        "import sys\n"
        "import loss_service, loss_service.client, loss_service.evaluation, loss_service.statistics\n"
        "import loss_service.server, loss_service.export, loss_service.weights\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
