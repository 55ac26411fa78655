"""Build hook (everything else is in pyproject.toml): every wheel, editable ones included, carries
`pretrain-lm-eval.pth` at its root, beside the packages, so that released lm-eval finds the
`pretrain` backend (pretrain/eval/lm_eval_plugin.py says why)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path("pretrain/eval/pretrain-lm-eval.pth")


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), self._pth_destination())

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), self._pth_destination()]

    def _pth_destination(self) -> str:
        """The root of the wheel being built. An editable wheel keeps none of build_lib (only what
        its editable strategy writes), but installs the root of its unpacked tree as it is: the
        `install` command's install_lib while setuptools builds it (PEP 660, `editable_wheel`)."""
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        return str(Path(root) / PTH.name)


setup(cmdclass={"build_py": BuildWithPth})
