"""Build hook (everything else is in pyproject.toml): the wheel carries `pretrain-lm-eval.pth` at
its root, beside the packages, so that released lm-eval finds the `pretrain` backend
(pretrain/eval/lm_eval_plugin.py says why)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path("pretrain/eval/pretrain-lm-eval.pth")


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


setup(cmdclass={"build_py": BuildWithPth})
