"""The report of `treespec bench`: summary ratios, the console table and the PNG."""
from __future__ import annotations

import json
from pathlib import Path


def summary(result: dict) -> dict:
    configs = [c for c in result["configs"] if c.get("drafter") != "none"]
    out: dict = {}
    if not configs:
        return out
    best = max(configs, key=lambda c: c["tokens_per_s"])
    base = next((c for c in result["configs"] if c["drafter"] == "none" and c["backend"] == best["backend"]), None)
    out["best"] = best["name"]
    out["best_tokens_per_s"] = best["tokens_per_s"]
    out["best_mean_accepted"] = best.get("mean_accepted")
    if base:
        out["x_vs_tree_none"] = round(best["tokens_per_s"] / base["tokens_per_s"], 3)
    plain = [c["tokens_per_s"] for c in result["configs"] if c["drafter"] == "none" and c["backend"] == best["backend"]]
    if len(plain) > 1:
        out["x_vs_fastest_plain"] = round(best["tokens_per_s"] / max(plain), 3)
    out["all_lossless"] = all(c.get("lossless", False) for c in configs)
    by = {b["name"]: b["tokens_per_s"] for b in result["baselines"]}
    if "hf greedy" in by:
        out["x_vs_hf_greedy"] = round(best["tokens_per_s"] / by["hf greedy"], 3)
    assisted = [v for k, v in by.items() if k.startswith("hf assisted")]
    if assisted:
        out["x_vs_best_hf_assisted"] = round(best["tokens_per_s"] / max(assisted), 3)
    best_acc = max(configs, key=lambda c: c.get("mean_accepted") or 0)
    out["best_mean_accepted_any"] = {"name": best_acc["name"], "mean_accepted": best_acc.get("mean_accepted")}
    by_category = accepted_by_category(best_acc, result.get("prompt_categories") or [])
    if by_category:
        out["best_mean_accepted_by_category"] = by_category
    return out


def accepted_by_category(config: dict, categories: list) -> dict:
    """Mean accepted tokens per verify step of one configuration, averaged over each category's prompts."""
    groups: dict[str, list[float]] = {}
    for category, accepted in zip(categories, config.get("mean_accepted_all") or []):
        groups.setdefault(category or "uncategorised", []).append(accepted)
    return {c: round(sum(v) / len(v), 3) for c, v in sorted(groups.items())}


def print_table(result: dict) -> None:
    print(f"{'configuration':48s} {'tok/s':>8s} {'x none':>7s} {'acc/step':>8s} {'lossless':>8s} "
          f"{'draft ms':>8s} {'verify ms':>9s} {'host ms':>8s}")
    base = {c["backend"]: c["tokens_per_s"] for c in result["configs"] if c.get("tree") == "none"}
    for c in result["configs"] + result["baselines"]:
        ps = c.get("per_step_ms", {})
        ref = base.get(c.get("backend"), None) or next(iter(base.values()), None)
        ratio = f"{c['tokens_per_s'] / ref:.2f}" if ref else "-"
        print(f"{c['name'][:48]:48s} {c['tokens_per_s']:8.1f} {ratio:>7s} {c.get('mean_accepted') or 0:8.2f} "
              f"{str(c.get('lossless', '-')):>8s} {ps.get('draft') or 0:8.2f} {ps.get('verify') or 0:9.2f} "
              f"{ps.get('host') or 0:8.2f}")
    print(json.dumps(result.get("summary", {})))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    configs = [c for c in result["configs"] if c.get("drafter") != "none"]
    for (backend, kind) in sorted({(c["backend"], c["drafter"]) for c in configs}):
        pts = sorted((c.get("mean_tree_size") or 0, c["tokens_per_s"], c["tree"]) for c in configs
                     if c["backend"] == backend and c["drafter"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{backend} {kind}")
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7)
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 5, 1, 5))])
    for c in [c for c in result["configs"] if c.get("drafter") == "none"] + result["baselines"]:
        ax.axhline(c["tokens_per_s"], linestyle=next(styles, "--"), color="gray", linewidth=1)
        ax.annotate(c["name"], (0, c["tokens_per_s"]), fontsize=7, color="gray")
    ax.set_xlabel("mean tree size (nodes, root included)")
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title("tokens/s vs tree size")
    ax.legend(fontsize=8)
    ax = axes[1]
    best: dict = {}
    for c in configs:
        if c["drafter"] not in best or c["tokens_per_s"] > best[c["drafter"]]["tokens_per_s"]:
            best[c["drafter"]] = c
    width = 0.8 / max(len(best), 1)
    for i, (kind, c) in enumerate(sorted(best.items())):
        hist = c.get("accepted_histogram", [])
        total = sum(hist) or 1
        ax.bar([x + i * width for x in range(len(hist))], [h / total for h in hist], width=width,
               label=f"{kind} ({c['tree']}, mean {c.get('mean_accepted')})")
    ax.set_xlabel("tokens per verify step (accepted + bonus)")
    ax.set_ylabel("fraction of steps")
    ax.set_title("accepted length histogram (best tree per drafter)")
    ax.legend(fontsize=8)
    ax = axes[2]
    for name, curve in result.get("verify_curve_ms", {}).items():
        xs = [int(k) for k in curve]
        ax.plot(xs, list(curve.values()), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree tokens T")
    ax.set_ylabel("ms per target step")
    ax.set_title("verify latency vs tree size")
    ax.legend(fontsize=8)
    title = f"treespec bench: {result.get('gpu') or result['device']}, {result['num_prompts']} prompts, " \
            f"{result['max_new_tokens']} new tokens, greedy, batch 1"
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
