"""`deepseek-moe-convert merge-lora` as a script: python conversion/merge_lora.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="merge-lora"))
