"""`deepseek-moe-convert to-mp` as a script: python conversion/to_mp.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["to-mp", *sys.argv[1:]]))
