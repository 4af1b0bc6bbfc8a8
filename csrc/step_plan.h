// The step plan (note [step plan] in step_plan.cpp): bound into pyoptim._C.
#pragma once

#include <Python.h>

namespace pyoptim {

// Adds the StepPlan class to the module `pyoptim._C`.
void bind_step_plan(PyObject* module);

}  // namespace pyoptim
