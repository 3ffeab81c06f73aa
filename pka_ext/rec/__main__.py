from pka_ext.rec.cli import main

main()
