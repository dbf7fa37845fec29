"""`deepseek-moe-convert quantize` as a script: python conversion/quantize.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["quantize", *sys.argv[1:]]))
