"""`deepseek-moe-convert to-official` as a script: python conversion/to_official.py --help"""

import sys

from deepseek_moe_convert import main

sys.exit(main(command="to-official"))
