# Edge Bastion device firmware. Every module here runs on MicroPython (boards and the unix
# port, board `sim`) and imports under CPython, so the pure codecs are tested with pytest and
# hypothesis as well as under the real `micropython` binary.
