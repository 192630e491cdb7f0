from svp.cli import run

run()
