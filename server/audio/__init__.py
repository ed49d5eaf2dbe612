"""Audio in: decoding uploads (``decode``, in processes of their own: ``decoders``), holding
them where the form parser left them (``upload``), and cutting long audio into pieces at pauses
(``pieces``). ``decode`` and ``decoders`` import no faster-whisper, so a decoder process stays
small; this package re-exports nothing for the same reason.
"""
