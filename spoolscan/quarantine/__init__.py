"""The quarantine: one store on disk for every source (``store``), and the
``spoolscan quarantine`` commands that list, show, release, delete and purge it
(``commands``)."""
