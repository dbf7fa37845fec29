"""`deepseek-moe-convert to-official` as a script: python conversion/to_official.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["to-official", *sys.argv[1:]]))
