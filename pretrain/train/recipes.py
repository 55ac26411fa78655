"""The shipped recipes (`pretrain/recipes/`, also `configs/` in a clone), found by name.

`pretrain fit --config tiny` and `pretrain submit --config continual/rewarm-cosine-replay5` name a
shipped recipe; a path to a YAML file works as before and wins when both exist.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.errors import UserError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes, e.g. "tiny", "continual/infinite-anneal"."""
    return sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))


def recipe_path(config: str) -> str:
    """`config` itself when it is a file, else the shipped recipe of that name."""
    if Path(config).is_file():
        return config
    name = config.removesuffix(".yaml").removeprefix("configs/")
    shipped = RECIPES / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise UserError(
        f"--config {config}: no such file and no shipped recipe of that name; shipped: {', '.join(shipped_recipes())}"
    )
