"""`UserError`: the one base class of the project's one-line errors.

A problem with the user's input or files (a missing weights file, a bad prompt, a corrupt checkpoint, an
unusable output path) is raised as a subclass of `UserError` declared beside the code that raises it
(`StudentWeightsError` beside the student's weight loader, `PromptFileError` beside the prompt parser,
`TeacherWeightsNotFoundError` beside the teachers' loaders, ...). Its message is one line that says what is
wrong and what to do. The `prd` command line prints any of them as `prd: error: <message>` and exits with
code 2, without a traceback.

It lives here, in the lowest layer (this module imports nothing), so that renderers, datamodules, teachers
and lightning_modules can all declare their own subclasses.
"""


class UserError(Exception):
    """A problem with the user's input or files; printed as one line, exit code 2."""
