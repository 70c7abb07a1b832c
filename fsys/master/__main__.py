from fsys.master.cli import run

run()
