"""`deepseek-moe-convert verify` as a script: python conversion/verify.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["verify", *sys.argv[1:]]))
