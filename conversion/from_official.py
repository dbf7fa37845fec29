"""`deepseek-moe-convert from-official` as a script: python conversion/from_official.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["from-official", *sys.argv[1:]]))
