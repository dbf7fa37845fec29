"""`deepseek-moe-convert merge-lora` as a script: python conversion/merge_lora.py --help"""

import sys

from modeling_deepseek_moe.conversion.cli import main

sys.exit(main(["merge-lora", *sys.argv[1:]]))
