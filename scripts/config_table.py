"""Write docs/CONFIG.md, the table of every training config key, from the declarations of
``sphereconv.engine.config.TrainConfig`` (tests/engine/test_config_table.py checks it is current)."""

from pathlib import Path

from sphereconv.engine.config import config_table

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    target.write_text(config_table())
    print(f"wrote {target}")
