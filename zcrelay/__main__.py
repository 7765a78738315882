try:
    from zcrelay.cli import main
except KeyboardInterrupt:  # Ctrl-C during the first imports: 130, as main() gives, no traceback
    raise SystemExit(130) from None

main()
