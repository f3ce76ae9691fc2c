"""A build step only (everything else is in pyproject.toml): the zoo recipes (``zoo/*.toml``) and meta-model
configs (``train/*.toml``), whose source is the repository's top-level folders, are copied into the package
as ``wsnets/recipes`` and ``wsnets/configs``, so that an installed wheel finds them by name
(:mod:`wsnets.resources`). A source checkout (editable install) reads the top-level folders themselves."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"zoo": "recipes", "train": "configs"}  # source folder -> folder inside the package


class BuildWithResources(build_py):
    def run(self) -> None:
        super().run()
        for src, dst in SHIPPED.items():
            out = Path(self.build_lib, "wsnets", dst)
            self.mkpath(str(out))
            for f in sorted((ROOT / src).glob("*.toml")) + sorted((ROOT / src).glob("README.md")):
                self.copy_file(str(f), str(out / f.name))


setup(cmdclass={"build_py": BuildWithResources})
