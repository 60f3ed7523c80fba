import sys

from jaxgen.cli import main
from jaxgen.launch import watch_launcher

watch_launcher()  # only in a process `jaxgen launch local` started: stops it when the launcher dies
sys.exit(main())
