# Metadata lives in setup.cfg. This file adds one build step: a wheel carries the Hydra configs.
# conf/ sits beside the packages (the layout the design card fixes), outside any package, so a
# non-editable install would not find it; build_py copies it into pretrain/_conf/ (symlinks resolved),
# where pretrain.core.run.configs.config_dir looks first. Source checkouts and editable installs read conf/.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "conf"
        if not self.dry_run and src.is_dir():
            dst = Path(self.build_lib) / "pretrain" / "_conf"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
