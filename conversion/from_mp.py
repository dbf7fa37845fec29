"""`deepseek-moe-convert from-mp` as a script: python conversion/from_mp.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["from-mp", *sys.argv[1:]]))
