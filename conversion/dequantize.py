"""`deepseek-moe-convert dequantize` as a script: python conversion/dequantize.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["dequantize", *sys.argv[1:]]))
