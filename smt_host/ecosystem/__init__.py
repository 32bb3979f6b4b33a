"""The technique x model adoption loop at neutral capacity, its reports and the lock."""
