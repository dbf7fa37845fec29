"""`deepseek-moe-convert quantize` as a script: python conversion/quantize.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="quantize"))
