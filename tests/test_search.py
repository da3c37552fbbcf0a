"""search.py's decisions on made-up scores: a change adopted only above the base's seed noise,
the mean of a change's two seeds, the table's noise line."""
import search

SMALL = ["--small-crops", "2"]


def candidates_and_scores(top1):
    """top1: run name -> validation top-1; the candidates of a set with the base's second seed."""
    flags = {"base": [], "seed 1": ["--seed", "1"], "2 small crops": SMALL,
             "2 small crops, seed 1": SMALL + ["--seed", "1"],
             "crop scale 0.5": ["--crop-scale", "0.5", "1"]}
    axis = {"base": "base", "seed 1": "seed", "crop scale 0.5": "crop"}
    candidates = [(axis.get(n, "crops"), n, flags[n]) for n in top1]
    scores = {n: {"top1": t, "pretrain_seconds": 300.0} for n, t in top1.items()}
    return candidates, scores


def test_adopt_needs_more_than_the_base_seeds_difference():
    # base seeds 88.0 / 88.4: noise 0.4 points, base mean 88.2
    within, scores = candidates_and_scores({"base": 88.0, "seed 1": 88.4, "crop scale 0.5": 88.55})
    assert search.adopt(within, scores)[1] == "base"  # +0.35 over the mean, not above 0.4
    above, scores = candidates_and_scores({"base": 88.0, "seed 1": 88.4, "crop scale 0.5": 88.65})
    assert search.adopt(above, scores)[1] == "crop scale 0.5"  # +0.45


def test_adopt_takes_the_mean_of_a_changes_two_seeds():
    # noise 0.2, base mean 88.1: the change's best seed is 1.0 above that, its mean only 0.1
    cands, scores = candidates_and_scores({"base": 88.0, "seed 1": 88.2, "2 small crops": 89.1,
                                           "2 small crops, seed 1": 87.3})
    assert search.adopt(cands, scores)[1] == "base"
    cands, scores = candidates_and_scores({"base": 88.0, "seed 1": 88.2, "2 small crops": 89.1,
                                           "2 small crops, seed 1": 88.9})
    assert search.adopt(cands, scores)[1] == "2 small crops"


def test_table_states_the_seed_means_and_the_noise(tmp_path):
    cands, scores = candidates_and_scores({"base": 88.0, "seed 1": 88.4, "2 small crops": 88.1,
                                           "2 small crops, seed 1": 88.3})
    chosen = search.adopt(cands, scores)
    search.write_table("--dataset fashion-mnist", "multicrop", str(tmp_path), cands, scores, chosen,
                       {})
    table = (tmp_path / "search_multicrop.md").read_text()
    assert "Chosen: **base**" in table
    assert "base 88.20 (+-0.20), 2 small crops 88.20 (+-0.10)" in table
    assert "differ (0.40 points)" in table
    assert "| 2 small crops, seed 1 | `--small-crops 2 --seed 1` | 88.30 | +0.30 | 300 |" in table
