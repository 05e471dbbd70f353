"""benchmarks/attention_cost.py: its counts cover what the geometry makes each query see, and it reads profiles."""

import json
import sys

import pytest

from conftest import script_module

LENGTH = 512


@pytest.fixture(scope="module")
def cost():
    yield from script_module("benchmarks/attention_cost.py", "attention_cost")


@pytest.fixture(scope="module")
def plan(cost):
    return cost.make_plan(LENGTH, cost.BlossomRecConfig())


def test_stis_visits_hold_every_stis_key(cost, plan):
    """The key blocks a query block's STIS tiles visit (own block included) hold every key t - delta of its
    queries, and each visited block holds at least one of them."""
    size, geometry = plan.common["SEL_B"], cost.SparseGeometry.from_config(cost.BlossomRecConfig())
    for blk in range(plan.num_blocks):
        needed = {(t - delta) // size for t in range(blk * size, (blk + 1) * size)
                  for delta in geometry.stis_offsets(LENGTH) if t - delta >= 0}
        visited = {blk - m for m in range(1, min(plan.stis["M_NEAR"], blk) + 1)}
        visited |= {blk - (plan.stis["P_FAR"] << i) for i in range(plan.stis["n_far"])
                    if (plan.stis["P_FAR"] << i) <= blk}
        assert needed == visited | {blk}, blk
        assert cost.stis_visits(plan, blk) == len(visited)


def test_counted_pairs_cover_each_branch(cost, plan):
    """Each kernel's counted pairs are at least the pairs its branches need (per query head, over the batch)."""
    size, heads = plan.common["SEL_B"], plan.heads
    histories = cost.TOKENS // LENGTH
    compressed = sum(min(t // size, plan.num_compressed) for t in range(LENGTH)) * heads * histories
    selected = cost.selections(plan, LENGTH) * size * heads * histories
    work = cost.blossom_work(LENGTH, cost.BlossomRecConfig())
    assert work["compressed_forward"].pairs >= 3 * compressed  # the branch, then each key for 2 selection blocks
    assert work["compressed_backward_dkdv"].pairs >= compressed
    assert work["sparse_forward"].pairs >= selected + LENGTH * heads * histories  # + the own block's causal keys
    assert work["sparse_backward_dkdv"].pairs >= selected
    assert work["backward_dq"].pairs >= compressed + selected
    assert work["sparse_forward"].core_flops == histories * plan.kv_heads * plan.num_blocks * size * plan.group \
        * plan.num_selected * size * 4 * plan.block_d


def test_dense_pairs_are_the_causal_pairs(cost):
    dense = cost.dense_work(LENGTH, cost.BlossomRecConfig())
    causal = sum(t + 1 for t in range(LENGTH)) * 8 * (cost.TOKENS // LENGTH)
    assert dense["flash_forward"].pairs == dense["flash_backward"].pairs == causal
    assert dense["flash_backward"].tensor_flops == 10 * 16 * causal


def test_one_pass_lengths_are_refused_by_name(cost):
    with pytest.raises(SystemExit, match="L=200 takes the one-pass kernels"):
        cost.make_plan(200, cost.BlossomRecConfig())


PROFILE = """
== blossom_triton L=512: CUDA ms per step, by kernel
   0.400    1x  backward_dq
   0.300    1x  sparse_forward
   0.100    2x  void at::native::vectorized_gather_kernel<16, long>(char*, char*)
   1.000        total CUDA time

== blossom_triton L=512 compiled: CUDA ms per step, by kernel
   0.390    1x  backward_dq
   0.290    1x  sparse_forward
   0.900        total CUDA time
"""
DENSE_PROFILE = """
== sdpa L=512: CUDA ms per step, by kernel
   0.200    1x  cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16
   0.100    1x  cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16
   0.100    1x  nvjet_sm90_tst_216x128
   0.500        total CUDA time
"""


def rows_from(cost, tmp_path, blossom_output: str) -> tuple[list[dict], dict]:
    """The cost rows at LENGTH with blossom_triton's times from `blossom_output` and sdpa's from DENSE_PROFILE, and
    each row's measured ms by (model, kernel)."""
    (tmp_path / "blossom.txt").write_text(blossom_output)
    (tmp_path / "sdpa.txt").write_text(DENSE_PROFILE)
    profiles = [cost.read_profile(tmp_path / "blossom.txt"), cost.read_profile(tmp_path / "sdpa.txt")]
    rows = cost.rows_for(LENGTH, cost.BlossomRecConfig(), profiles)
    return rows, {(r["model"], r["kernel"]): r.get("ms") for r in rows}


def test_profiles_give_each_kernels_time_and_the_rest(cost, tmp_path):
    rows, measured = rows_from(cost, tmp_path, PROFILE)
    assert measured["blossom", "backward_dq"] == 0.39  # the compiled section where there is one
    assert measured["blossom", "outside the attention kernels"] == pytest.approx(0.9 - 0.39 - 0.29)
    assert measured["blossom", "compressed_forward"] is None
    # the flash kernels' 0.3 ms shared out by FLOPs (forward 4, backward 10 per pair and head dim)
    assert measured["dense", "flash_forward"] == pytest.approx(0.3 * 4 / 14)
    assert measured["dense", "outside the attention kernels"] == pytest.approx(0.2)
    ratios = cost.summary(LENGTH, rows)["ratios"]
    assert ratios["ms"] == pytest.approx(0.9 / 0.5)


def test_main_writes_the_table_json_and_plot(cost, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["attention_cost.py", "--lengths", str(LENGTH), "--output-dir", str(tmp_path)])
    cost.main()
    written = json.loads((tmp_path / "attention_cost.json").read_text())
    assert [s["length"] for s in written["summaries"]] == [LENGTH]
    assert 0 < written["summaries"][0]["ratios"]["pairs"] < 2
    assert (tmp_path / "attention_cost.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "attention_cost.txt").read_text()
    assert "| 512 | blossom | sparse_forward |" in printed


TUNE_OUTPUT = """
L=512: ms per forward+backward step
  variant    cfwd    sfwd      dq   sdkdv   cdkdv   other   total
     base   0.100   0.200   0.300   0.250   0.050   0.100   1.000
  chunk2k   0.100   0.210   0.320   0.250   0.050   0.100   1.030
"""


def test_tune_kernels_output_gives_the_kernels_times(cost, tmp_path):
    rows, measured = rows_from(cost, tmp_path, TUNE_OUTPUT)
    assert measured["blossom", "sparse_forward"] == 0.2 and measured["blossom", "compressed_backward_dkdv"] == 0.05
    assert ("blossom", "outside the attention kernels") not in measured
    ratios = cost.summary(LENGTH, rows)["ratios"]
    assert ratios["kernel_ms"] == pytest.approx(0.9 / 0.3)
    assert "ms" not in ratios  # the module's whole time is not in a tune file
