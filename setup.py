# Metadata lives in setup.cfg; this shim lets pip/uv build an editable install.
from setuptools import setup

setup()
