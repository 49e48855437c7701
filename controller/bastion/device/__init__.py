"""The controller's end of the device's serial line: the protocol as a pure session (`session`),
the serial and thread shell around it (`link`), the link as part of the running controller
(`hub`: events into the history, power by machine), and `bastion power|status|console|device`
(`cli`)."""
