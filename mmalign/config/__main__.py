"""python -m mmalign.config > docs/CONFIG.md"""

from mmalign.config.cli import config_doc

print(config_doc(), end="")
